"""``LatentDiffusion``: the components, loading and saving, and the text-to-image call."""

from __future__ import annotations

import re
import secrets
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..checks import MAX_SEED, check_float, check_size, positive_int, whole_number
from ..errors import InvalidInputError, MissingFileError
from ..models import architectures, folder
from ..models.hashing import weight_hash, weights_fingerprint
from ..models.lora import LoraSet
from ..models.textual_inversion import Embedding
from ..models.textual_inversion import expand as expand_tokens
from .images import ImageInput, image_hash, load_inputs
from .prompts import count_chunks, encode_prompts
from .recipe import save_png
from .samplers import make_scheduler, scheduler_from_config
from .sampling import StepCallback, denoise, initial_latents, make_generators, step_kwargs
from .starts import img2img_start, inpaint_start, known_pixels, pixel_processor
from .vae import VaeOptions
from .vae import decode as vae_decode

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Keys of an image's params that are also arguments of LatentDiffusion.__call__.
CALL_KEYS = (
    "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
    "guidance_rescale", "scheduler", "eta", "height", "width", "clip_skip", "image", "strength",
    "hires_scale", "hires_strength", "hires_upscale", "mask_image",
)  # fmt: skip
HIRES_UPSCALERS = ("latent", "pixel")
# Multistep schedulers whose history or warm-up cannot begin mid-schedule (image-to-image).
_NO_MIDWAY_START = ("PNDMScheduler", "LMSDiscreteScheduler")
DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "assets" / "default_model"  # latentdiff/assets
_NUMBERED = re.compile(r"^(\d{4,})-\d+\.png$")  # NNNN-SEED.png


@dataclass
class GenerationResult:
    """What a pipeline call returns: one entry per image in each field."""

    images: Any  # list of PIL images, or a (B, 3, H, W) / (B, H, W, 3) array, or (B, C, h, w) latents
    seeds: list[int]
    params: list[dict[str, Any]]  # everything needed to make image i again: pipe(**call_kwargs(p))

    def save(self, target: Union[str, Path]) -> list[Path]:
        """Write the images as PNGs with their recipes and return the paths.

        ``target`` ending in ``.png`` names the file (``name-1.png``, ``name-2.png``, ... when there
        are several images). Anything else is a folder, created if needed, that gets ``NNNN-SEED.png``
        files numbered on from the highest number already there, so earlier images are never replaced.
        """
        if not isinstance(self.images, list):
            raise InvalidInputError("only output_type='pil' results can be saved as PNG files")
        target = prepare_output(target)
        if target.suffix.lower() == ".png":
            if len(self.images) == 1:
                return [save_png(self.images[0], target, self.params[0])]
            names = [target.with_name(f"{target.stem}-{i + 1}.png") for i in range(len(self.images))]
            return [save_png(im, name, p) for im, name, p in zip(self.images, names, self.params)]
        taken = [int(m.group(1)) for p in target.iterdir() if (m := _NUMBERED.match(p.name))]
        number = max(taken, default=-1) + 1
        paths = []
        for image, seed, params in zip(self.images, self.seeds, self.params):
            while True:  # claim the next free number; another process may be saving here too
                try:
                    paths.append(save_png(image, target / f"{number:04d}-{seed}.png", params, exclusive=True))
                    break
                except FileExistsError:
                    number += 1
            number += 1
        return paths


def prepare_output(target: Union[str, Path]) -> Path:
    """Check an output target (``FILE.png`` or a folder) and create the folder it needs.

    Called before generating, so a bad target fails in a second, not after the images are made.
    """
    target = Path(target)
    if target.suffix.lower() == ".png":
        target.parent.mkdir(parents=True, exist_ok=True)
        return target
    if target.suffix and not target.is_dir():
        raise InvalidInputError(
            f"cannot write {target}: images are saved as PNG (the recipe lives in a PNG text chunk); "
            "give a .png file name or a folder"
        )
    target.mkdir(parents=True, exist_ok=True)
    return target


def call_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline arguments that remake the image described by ``params`` (an image's recipe)."""
    if params.get("prompt") is None:
        raise InvalidInputError("this image was made from prompt_embeds; its recipe cannot remake it")
    for key in ("image", "mask_image"):
        if params.get(f"{key.split('_')[0]}_hash") and not params.get(key):
            raise InvalidInputError(f"this image's {key} was given as an image object, not a file; its recipe cannot remake it")
    return {k: params[k] for k in CALL_KEYS if k in params}


class LatentDiffusion:
    """A latent text-to-image model: VAE, CLIP text encoder and tokenizer, U-Net, scheduler.

    Build one with :meth:`from_pretrained` (a diffusers-format folder) or :meth:`from_preset`
    (random weights of a named architecture), then call it with a prompt.
    """

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler_config: dict, source: dict):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        # The raw scheduler config of the model (as in scheduler/scheduler_config.json); named
        # samplers are built from it, see schedulers.py for why not from self.scheduler.config.
        self.scheduler_config = dict(scheduler_config)
        self.scheduler = scheduler_from_config(self.scheduler_config)
        self.source = source  # where the weights came from: {"path": ...} or {"preset": ..., "seed": ...}
        self._hash: Optional[tuple[tuple, str]] = None  # (weights fingerprint, hash)
        self.vae_options = VaeOptions()  # tiling above a size, fp32 retry of a non-finite half decode (vae.py)
        self.fast_options = None  # set by optimize()
        self.compile_report: list = []  # one record per compiled shape (fast.py)
        self.loras = LoraSet()  # LoRA adapters: load_lora / fuse_lora / unload_lora
        self.embeddings: list[Embedding] = []  # textual inversions: load_textual_inversion

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, Path, None] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        variant: Optional[str] = None,
    ) -> "LatentDiffusion":
        """Load a diffusers-format SD 1.x / 2.x folder; with no path, the embedded default model.

        Never touches the network. ``variant`` picks files such as ``*.fp16.safetensors``. A path to
        a single ``.safetensors`` / ``.ckpt`` file is passed on to :meth:`from_single_file`.
        """
        if path is None:
            if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
                raise MissingFileError(
                    f"this latentdiff build has no embedded default model ({DEFAULT_MODEL_DIR} is missing); pass a model folder "
                    "(from_pretrained(PATH), --model PATH) or random weights (from_preset('tiny'), --preset tiny)"
                )
            path = DEFAULT_MODEL_DIR  # shipped in float16 to stay small; loaded in float32 unless asked
        if Path(path).is_file():
            return cls.from_single_file(path, dtype=dtype)
        parts = folder.load_folder(path, dtype=dtype, variant=variant)
        return cls(**parts, source={"path": str(Path(path).resolve())})

    @classmethod
    def from_single_file(
        cls,
        path: Union[str, Path],
        variant: Optional[str] = None,
        strict: bool = True,
        *,
        dtype: Optional[torch.dtype] = None,
    ) -> "LatentDiffusion":
        """Load an SD 1.x / 2.x checkpoint in the original single-file layout, offline.

        ``variant`` (``sd1``, ``sd2``, ``sd2-v``) overrides detection from keys and shapes. Every key
        is accounted for: with ``strict`` a missing, unexpected or misshapen key is an error naming
        it; ``strict=False`` prints the report and loads what fits. See ``single_file.py``.
        """
        from ..models.single_file import load_single_file

        parts, arch, _ = load_single_file(path, variant=variant, strict=strict, dtype=dtype)
        return cls(**parts, source={"path": str(Path(path).resolve()), "variant": arch.name})

    def save_single_file(self, path: Union[str, Path]) -> Path:
        """Write one original-layout file (safetensors; ``.ckpt`` for a pickle) that web UIs,
        diffusers' ``from_single_file`` and :meth:`from_single_file` load."""
        from ..models.single_file import save_single_file

        return save_single_file(self, path)

    # -- adapters ---------------------------------------------------------------------------------

    def load_lora(self, path: Union[str, Path], scale: float = 1.0, name: Optional[str] = None):
        """Apply a LoRA (kohya or peft/diffusers layout) to the U-Net and text encoder.

        Several can be loaded, each with its own ``scale`` (``name`` defaults to the file name).
        Prints and returns a ``LoraReport`` (keys applied, keys that matched nothing); a LoRA that
        matches nothing is an error. The weights are untouched until :meth:`fuse_lora`.
        """
        return self.loras.load(self, path, scale=scale, name=name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        self.loras.set_scale(name, scale)

    def fuse_lora(self) -> None:
        """Add the loaded LoRAs' deltas to the weights (faster calls; the weight hash changes)."""
        self.loras.fuse()

    def unload_lora(self, name: Optional[str] = None) -> None:
        """Remove one LoRA, or all of them (restoring the exact original weights if fused)."""
        self.loras.unload(name)

    def load_textual_inversion(self, path: Union[str, Path], token: Optional[str] = None):
        """Add a textual-inversion embedding (.safetensors / .pt; A1111 or diffusers layout) as
        ``token`` (default: the file's own token, or its name), usable in prompts."""
        from ..models.textual_inversion import add_embedding

        embedding = add_embedding(self.tokenizer, self.text_encoder, path, token)
        self.embeddings.append(embedding)
        return embedding

    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> "LatentDiffusion":
        """Random weights of architecture ``name`` (``tiny``, ``sd15``, ``sd21``); same seed, same weights."""
        return cls(**architectures.build_components(name, seed), source={"preset": name, "seed": seed})

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write a diffusers-format folder (safetensors) that diffusers' StableDiffusionPipeline loads too."""
        return folder.save_folder(
            path,
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler_config=self.scheduler_config,
        )

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None):
        """Move (and optionally cast) the three networks; returns the pipeline."""
        for module in (self.unet, self.vae, self.text_encoder):
            if device is not None:
                module.to(device)
            if dtype is None:
                continue
            if getattr(module, "_keep_in_fp32_modules", None):
                module.to(dtype)  # diffusers keeps the listed modules in float32
            else:  # plain cast: diffusers' .to() warns about fp32-only modules even when it lists none
                torch.nn.Module.to(module, dtype=dtype)
        return self

    def optimize(self, compile: bool = True, **options) -> "LatentDiffusion":
        """The fast path, in place: half precision on CUDA, channels_last, fused QKV projections and
        ``torch.compile`` of the U-Net and the VAE decoder (see ``latentdiff.fast.FastOptions`` for
        ``options``). Call it after ``to(device)``; returns the pipeline. Compilation happens at the
        first call of each shape; ``compile_report`` lists what it cost."""
        from .optimize import FastOptions, optimize

        return optimize(self, FastOptions(compile=compile, **options))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device  # (diffusers' .device walks every module)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def weight_hash(self) -> str:
        """Hash of all network weights (see ``metadata.weight_hash``).

        Cached until a weight is replaced, moved, cast or changed in place (training, LoRA fusing).
        """
        nets = (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder))
        key = weights_fingerprint(m for _, m in nets)
        if self._hash is None or self._hash[0] != key:
            self._hash = (key, weight_hash(nets))
        return self._hash[1]

    def describe(self) -> dict[str, Any]:
        """Components, parameter counts, dtypes, scheduler config and weight hash (for ``latentdiff info``)."""
        parts = {}
        for name in ("unet", "vae", "text_encoder"):
            module = getattr(self, name)
            parts[name] = {
                "class": type(module).__name__,
                "parameters": sum(p.numel() for p in module.parameters()),
                "dtype": str(module.dtype).removeprefix("torch."),
                "device": str(module.device),
            }
        parts["tokenizer"] = {"class": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer)}
        return {
            "source": self.source,
            "components": parts,
            "default_size": [self.default_size] * 2,
            "prediction_type": self.scheduler_config.get("prediction_type", "epsilon"),
            "scheduler": self.scheduler_config,
            "weight_hash": self.weight_hash(),
        }

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: Union[int, Sequence[int], None] = None,
        scheduler: Optional[str] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        callback: Optional[StepCallback] = None,
        progress: Optional[bool] = None,
        clip_skip: int = 0,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        image: Union[ImageInput, Sequence[ImageInput], None] = None,
        strength: Optional[float] = None,
        mask_image: Union[ImageInput, Sequence[ImageInput], None] = None,
        hires_scale: Optional[float] = None,
        hires_strength: Optional[float] = None,
        hires_upscale: Optional[str] = None,
    ) -> GenerationResult:
        """Text to image.

        Image order is prompt-major: all images of prompt 0, then of prompt 1, and so on. Image i
        is made from ``seeds[i]`` alone (see the seed contract in the README). ``scheduler`` is a
        name from ``latentdiff.schedulers.SAMPLERS``, or None for the model's own. ``callback``
        is called after every step as ``callback(step_index, timestep, latents)``. ``progress``
        shows a progress bar (default: when stderr is a terminal).

        Prompts may be longer than 75 tokens and use the weighting syntax (see ``prompts.py``);
        ``clip_skip`` = N conditions on the N-th last text-encoder layer. ``prompt_embeds`` (B, L, D)
        and ``negative_prompt_embeds`` replace ``prompt`` / ``negative_prompt``. Prompts are batched
        by their length in 77-token chunks, so a short prompt's image does not depend on a long
        prompt sharing its call (``callback`` then runs once per length).

        Image-to-image: ``image`` (a path or PIL image, or one per prompt) is encoded, noised to
        the level ``strength`` (0..1, default 0.6) and denoised over the last ``strength`` part of
        the steps; ``height`` / ``width`` default to the image's size rounded down to a multiple
        of 8. The encoder's sample and the added noise are the 1st and 2nd draws of each image's
        own generator (as diffusers' img2img pipeline draws them).

        Inpainting: with ``mask_image`` too (white = repaint; one, or one per prompt; resized to
        the image with a warning if its size differs), only the masked region is made anew
        (``strength`` defaults to 1). A 9-channel inpainting U-Net is used as such; a standard one
        by re-noising and blending the known region back at every step. Outside the mask the
        output is the input image after a VAE round trip, pixel for pixel.

        Resolution enhancement: with ``hires_scale`` (> 1) the images made at ``height`` x ``width``
        are upscaled by that factor (``hires_upscale`` "latent": bilinear in latent space; "pixel":
        decoded, Lanczos-resized, re-encoded) and refined by image-to-image at ``hires_strength``.
        """
        # 1. check the request and expand it to one entry per image
        if (prompt is None) == (prompt_embeds is None):
            raise InvalidInputError("give prompt or prompt_embeds (one of the two)")
        if prompt_embeds is not None:
            prompts = [None] * _check_embeds(prompt_embeds, "prompt_embeds", self.text_encoder).shape[0]
        else:
            prompts = _as_prompt_list(prompt, "prompt")
        if negative_prompt_embeds is not None:
            if negative_prompt is not None or prompt_embeds is None:
                raise InvalidInputError("negative_prompt_embeds goes with prompt_embeds, and replaces negative_prompt")
            if _check_embeds(negative_prompt_embeds, "negative_prompt_embeds", self.text_encoder).shape != prompt_embeds.shape:
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
        n = positive_int(num_images_per_prompt, "num_images_per_prompt")
        steps = positive_int(num_inference_steps, "num_inference_steps")
        init_images, image_names = load_inputs(image, len(prompts))
        masks, mask_names = load_inputs(mask_image, len(prompts), what="mask_image")
        if masks is not None and any(np.asarray(m.convert("L")).max() < 128 for m in masks):
            warnings.warn("a mask_image has no white at all, so nothing is repainted", stacklevel=2)
        if masks is not None and init_images is None:
            raise InvalidInputError("mask_image needs image= (the picture to inpaint)")
        if masks is None and self.unet.config.in_channels != self.vae.config.latent_channels:
            raise InvalidInputError(
                f"this U-Net takes {self.unet.config.in_channels} input channels (an inpainting model); "
                "give image= and mask_image="
            )
        if masks is not None and strength is None:
            strength = 1.0
        if init_images is None and strength is not None:
            raise InvalidInputError("strength applies to image-to-image only; give image= too, or drop strength")
        if init_images is not None:
            strength = check_float(0.6 if strength is None else strength, "strength", 0.0, 1.0,
                                   "0 keeps the image, 1 replaces it")  # fmt: skip
            first = init_images[0]
            f = self.vae_scale_factor
            height = first.height // f * f if height is None else height
            width = first.width // f * f if width is None else width
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
        height = check_size("height", self.default_size if height is None else height, self.vae_scale_factor)
        width = check_size("width", self.default_size if width is None else width, self.vae_scale_factor)
        guidance_scale = check_float(guidance_scale, "guidance_scale", 0.0, None, "use 1 for no guidance, 7.5 is usual")
        guidance_rescale = check_float(guidance_rescale, "guidance_rescale", 0.0, 1.0, "0.7 is usual for v-prediction")
        eta = check_float(eta, "eta", 0.0, None, "eta is DDIM's noise level, 0 = deterministic")
        if output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if self.unet.config.time_cond_proj_dim is not None:
            raise InvalidInputError(
                "this U-Net takes a guidance embedding (an LCM-distilled model); latentdiff does not run such "
                "models yet: use a standard SD 1.x / 2.x U-Net"
            )
        total = len(prompts) * n
        seeds = _expand_seeds(seed, total)
        sched = self._make_scheduler(scheduler)
        sched_name = scheduler or type(sched).__name__
        if eta > 0 and "eta" not in step_kwargs(sched, [], eta):
            warnings.warn(f"eta={eta} has no effect with scheduler {sched_name}; use 'ddim'", stacklevel=3)
        midway = (init_images is not None and strength < 1.0) or hires_scale is not None  # not from pure noise
        if midway and type(sched).__name__ in _NO_MIDWAY_START:
            warnings.warn(
                f"{type(sched).__name__} cannot start part-way through its schedule accurately (diffusers' "
                "pipelines have the same flaw), so image-to-image keeps some noise; ddim, euler, heun, "
                "dpmpp_2m or unipc start exactly",
                stacklevel=3,
            )
        if guidance_scale <= 1.0 and (any(negatives) or negative_prompt_embeds is not None):
            warnings.warn("negative_prompt has no effect when guidance_scale <= 1 (no unconditional pass)", stacklevel=3)
        try:
            sched.set_timesteps(steps, device=self.device)
        except ValueError as e:  # e.g. more steps than the schedule has timesteps
            raise InvalidInputError(f"scheduler {sched_name} cannot run {steps} steps: {e}") from None
        if progress is None:
            progress = sys.stderr.isatty()

        # 2. encode the prompts, one group per length in chunks: [(prompt indices, cond, uncond)],
        #    cond / uncond (P, 77k, D); no unconditional pass without guidance
        groups = self._encode(prompts, negatives, guidance_scale > 1.0, clip_skip, prompt_embeds, negative_prompt_embeds)

        # 3.-4. each image's start (noise, or its input image) from its own generator; denoise
        generators = make_generators(seeds)
        run = dict(groups=groups, n=n, generators=generators, scheduler=scheduler, steps=steps,
                   guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
                   callback=callback, progress=progress)  # fmt: skip
        if init_images is None:
            latents = self._sample(**run, size=(height, width))
        else:
            picked = [init_images[i // n if len(init_images) > 1 else 0] for i in range(total)]
            picked_masks = None if masks is None else [masks[i // n if len(masks) > 1 else 0] for i in range(total)]
            if picked_masks is not None and any(m.size != im.size for m, im in zip(picked_masks, picked)):
                warnings.warn("mask_image and image differ in size; the mask is resized to the image", stacklevel=3)
            latents = self._sample(**run, size=(height, width), init=picked, strength=strength, masks=picked_masks)

        # 4b. resolution enhancement: upscale, then image-to-image at the larger size, with the
        #     same generators (their streams simply go on)
        if hires_scale is not None:
            f = self.vae_scale_factor
            big = (round(height * hires_scale / f) * f, round(width * hires_scale / f) * f)
            if hires_upscale == "latent":
                start = torch.nn.functional.interpolate(latents, size=(big[0] // f, big[1] // f), mode="bilinear")
            else:
                start = [im.resize((big[1], big[0]), Image.LANCZOS) for im in self._decode(latents, "pil")]
            latents = self._sample(**run, size=big, init=start, strength=hires_strength)

        # 5. decode
        keep = None
        if masks is not None and hires_scale is None and output_type != "latent":
            keep = known_pixels(self, picked, picked_masks, (height, width))
        images = latents if output_type == "latent" else self._decode(latents, output_type, keep)
        base = {
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "guidance_rescale": guidance_rescale,
            "scheduler": scheduler,
            "scheduler_class": type(sched).__name__,
            "clip_skip": clip_skip,
            "eta": eta,
            "height": height,
            "width": width,
            "model": self.source,
            "model_hash": self.weight_hash(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
            # Kernels round differently at other batch sizes (~1e-6): an image remade alone from a
            # batch may differ by one pixel level. Recorded so a remake can say so.
            "batch_size": total,
            "latentdiff_version": _version(),
        }
        if self.loras.adapters:  # not in the weight hash unless fused: recorded so a remake can reapply them
            base["loras"] = self.loras.records()
        if self.embeddings:
            base["embeddings"] = [e.record() for e in self.embeddings]
        if init_images is not None:
            base["strength"] = strength
        if hires_scale is not None:
            base.update(hires_scale=hires_scale, hires_strength=hires_strength, hires_upscale=hires_upscale)
        params = [
            {"prompt": prompts[i // n], "negative_prompt": negatives[i // n], "seed": seeds[i], **base}
            for i in range(total)
        ]
        if init_images is not None:  # which input each image came from (a path, or only its hash)
            for i, p in enumerate(params):
                k = i // n if len(init_images) > 1 else 0
                p["image"], p["image_hash"] = image_names[k], image_hash(init_images[k])
                if masks is not None:
                    k = i // n if len(masks) > 1 else 0
                    p["mask_image"], p["mask_hash"] = mask_names[k], image_hash(masks[k])
        return GenerationResult(images=images, seeds=seeds, params=params)

    def _encode(self, prompts, negatives, guided: bool, clip_skip: int, prompt_embeds, negative_prompt_embeds):
        """Conditioning grouped by length: [(prompt indices, cond (P, 77k, D), uncond or None)].

        A prompt and its negative are padded to the longer of the two; prompts of equal length
        share a group, so nothing about an image depends on the other prompts of the call.
        """
        tok, enc = self.tokenizer, self.text_encoder
        if prompt_embeds is not None:
            cond = prompt_embeds.to(enc.device, enc.dtype)
            if not guided:
                return [(list(range(len(prompts))), cond, None)]
            if negative_prompt_embeds is None:
                chunks, rest = divmod(cond.shape[1], tok.model_max_length)
                if rest:
                    raise InvalidInputError(
                        f"prompt_embeds has length {cond.shape[1]}, not a multiple of {tok.model_max_length}; "
                        "pass negative_prompt_embeds of the same shape"
                    )
                uncond = encode_prompts(tok, enc, negatives, clip_skip=clip_skip, num_chunks=chunks)
            else:
                uncond = negative_prompt_embeds.to(enc.device, enc.dtype)
            return [(list(range(len(prompts))), cond, uncond)]
        if self.embeddings:  # multi-vector tokens expand to one token per vector
            prompts = [expand_tokens(p, self.embeddings) for p in prompts]
            negatives = [expand_tokens(q, self.embeddings) for q in negatives]
        lengths = [
            max(count_chunks(tok, p), count_chunks(tok, q) if guided else 1) for p, q in zip(prompts, negatives)
        ]
        groups = []
        for k in sorted(set(lengths), key=lengths.index):
            idx = [i for i, length in enumerate(lengths) if length == k]
            cond = encode_prompts(tok, enc, [prompts[i] for i in idx], clip_skip=clip_skip, num_chunks=k)
            uncond = None
            if guided:
                uncond = encode_prompts(tok, enc, [negatives[i] for i in idx], clip_skip=clip_skip, num_chunks=k)
            groups.append((idx, cond, uncond))
        return groups

    def _sample(self, *, groups, n, generators, scheduler, steps, size, init=None, strength=1.0, masks=None, **loop):
        """Denoise every group; returns z_0 for all images (B, C, h, w), in image order.

        ``init`` None starts from noise; a list of PIL images (one per image) or a latent batch
        (B, C, h, w) starts image-to-image at ``strength``; with ``masks`` too, it inpaints.
        """
        f = self.vae_scale_factor
        shape = (self.vae.config.latent_channels, size[0] // f, size[1] // f)
        finished: list[Optional[torch.Tensor]] = [None] * len(generators)
        for indices, cond, uncond in groups:
            images = [i * n + j for i in indices for j in range(n)]  # prompt-major image order
            gens = [generators[m] for m in images]
            sched = self._make_scheduler(scheduler)
            sched.set_timesteps(steps, device=self.device)
            inpaint = None
            if init is None:
                latents = initial_latents(gens, shape, device=self.device, dtype=self.unet.dtype) * sched.init_noise_sigma
                timesteps = sched.timesteps
            elif masks is not None:
                start = [init[m] for m in images]
                latents, timesteps, inpaint = inpaint_start(self, start, [masks[m] for m in images], size, gens, sched,
                                                                  steps, strength)  # fmt: skip
            else:
                start = init[images] if isinstance(init, torch.Tensor) else [init[m] for m in images]
                latents, timesteps = img2img_start(self, start, size, gens, sched, steps, strength)
            latents = denoise(
                self.unet, sched, latents, cond.repeat_interleave(n, dim=0),
                None if uncond is None else uncond.repeat_interleave(n, dim=0),
                generators=gens, timesteps=timesteps, inpaint=inpaint, **loop,
            )  # fmt: skip
            for m, z in zip(images, latents):
                finished[m] = z
        return torch.stack(finished)

    def _make_scheduler(self, name: Optional[str]):
        if name is None:
            return _fresh(self.scheduler)  # the model's own, or whatever the user set pipe.scheduler to
        return make_scheduler(name, self.scheduler_config)

    def _decode(self, latents: torch.Tensor, output_type: str, keep=None):
        """z_0 (B, C, h, w) -> images: (x / scaling_factor) through the VAE decoder, then [-1, 1] -> [0, 1].

        ``keep`` = (mask, pixels): outside the mask the decoded image is replaced by ``pixels``.
        """
        decoded = vae_decode(self.vae, latents, self.vae_options)  # (B, 3, H, W) in [-1, 1]
        if keep is not None:
            mask, known = keep
            decoded = mask * decoded + (1 - mask) * known
        return pixel_processor(self.vae_scale_factor).postprocess(decoded, output_type=output_type)


def _check_embeds(embeds, name: str, text_encoder) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] < 1:
        raise InvalidInputError(f"{name} must be a (batch, tokens, dim) tensor")
    if embeds.shape[-1] != text_encoder.config.hidden_size:
        raise InvalidInputError(
            f"{name} has dimension {embeds.shape[-1]}, this model's text encoder {text_encoder.config.hidden_size}"
        )
    return embeds


def _fresh(scheduler):
    """A new scheduler of the same class and config: schedulers keep per-run state."""
    return type(scheduler).from_config(scheduler.config)


def _version() -> str:
    from .._version import __version__

    return __version__


def _as_prompt_list(value, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise InvalidInputError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise InvalidInputError(f"{name} is an empty list; give at least one prompt (\"\" is an unconditional image)")
    return list(items)


def _expand_seeds(seed, total: int) -> list[int]:
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
