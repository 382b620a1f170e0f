"""``LatentDiffusion``: the components, loading and saving, and the text-to-image call."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from ..checks import MAX_SEED, Limits, torch_dtype, whole_number
from ..errors import InvalidInputError, MissingFileError, NonFiniteResultError
from ..models import architectures, folder
from ..models.hashing import weight_hash, weights_fingerprint
from ..models.lora import LoraSet
from ..models.textual_inversion import Embedding
from ..models.textual_inversion import expand as expand_tokens
from .images import ImageInput
from .prompts import CHUNK, count_chunks, encode_prompts
from .recipe import image_params
from .request import Request, hires_size, micro_conditioning
from .result import GenerationResult
from .control import Controls, default_controlnet, is_ip_adapter_key
from .samplers import fresh_scheduler, scheduler_from_config
from .sampling import Conditioning, StepCallback, denoise, guidance_embedding, initial_latents, make_generators
from .starts import end_timesteps, img2img_start, inpaint_start, known_pixels, pixel_processor
from .vae import VaeOptions
from .vae import decode as vae_decode

DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "assets" / "default_model"  # latentdiff/assets
# The default model's LCM-LoRA (distilled by training/configs/lcm-default-model.toml): from_pretrained(lcm=True), --lcm
DEFAULT_LCM_LORA = Path(__file__).parents[1] / "assets" / "default_model_lcm" / "lora.safetensors"
# What a call with an LCM-LoRA takes: the lcm sampler, few steps, no guidance pass
LCM_CALL = {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}


def check_default_lcm_lora() -> Path:
    """``DEFAULT_LCM_LORA``, or the one-line error that it is not shipped yet."""
    if not DEFAULT_LCM_LORA.is_file():
        raise MissingFileError(
            f"the default model's LCM-LoRA is not shipped yet ({DEFAULT_LCM_LORA} is missing): distil it with "
            "latentdiff train --config training/configs/lcm-default-model.toml (see training/README.md), or "
            "run the default model without --lcm"
        )
    return DEFAULT_LCM_LORA


class LatentDiffusion:
    """A latent text-to-image model: VAE, CLIP text encoder and tokenizer, U-Net, scheduler.

    SDXL models have a second text encoder and tokenizer (``text_encoder_2``, ``tokenizer_2``); the
    SDXL refiner has only that one (``text_encoder`` and ``tokenizer`` are None).

    Build one with :meth:`from_pretrained` (a diffusers-format folder) or :meth:`from_preset`
    (random weights of a named architecture), then call it with a prompt.
    """

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler_config: dict, source: dict,
                 text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt: Optional[bool] = None):  # fmt: skip
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        if (text_encoder is None) != (tokenizer is None) or (text_encoder_2 is None) != (tokenizer_2 is None):
            raise InvalidInputError("each text encoder needs its tokenizer")
        if text_encoder is None and text_encoder_2 is None:
            raise InvalidInputError("a model needs a text encoder")
        if architectures.is_sdxl(unet) != (text_encoder_2 is not None):
            raise InvalidInputError("an SDXL U-Net (addition_embed_type 'text_time') goes with a second text encoder "
                                    "(text_encoder_2), and only such a U-Net does")  # fmt: skip
        # SDXL: with no negative prompt, zeros stand for the unconditional embedding (diffusers' default
        # for base models; refiner folders turn it off)
        self.force_zeros_for_empty_prompt = (self.sdxl and self.time_id_count == 6) if force_zeros_for_empty_prompt is None \
            else bool(force_zeros_for_empty_prompt)  # fmt: skip
        # The raw scheduler config of the model (as in scheduler/scheduler_config.json); named
        # samplers are built from it, see samplers.py for why not from self.scheduler.config.
        self.scheduler_config = dict(scheduler_config)
        self.scheduler = scheduler_from_config(self.scheduler_config)
        self.source = source  # where the weights came from: {"path": ...} or {"preset": ..., "seed": ...}
        self._hash: Optional[tuple[tuple, str]] = None  # (weights fingerprint, hash)
        self.vae_options = VaeOptions()  # tiling above a size, fp32 retry of a non-finite half decode (vae.py)
        self.fast_options = None  # set by optimize()
        self.compile_report: list = []  # one record per compiled shape (optimize.py)
        self.loras = LoraSet()  # LoRA adapters: load_lora / fuse_lora / unload_lora
        self.embeddings: list[Embedding] = []  # textual inversions: load_textual_inversion
        self.limits = Limits()  # the most one call may ask for (size, steps, images, inputs, prompt length)
        self.controls = Controls()  # ControlNets / T2I-Adapters / IP-Adapter: load_controlnet, load_t2i_adapter, load_ip_adapter

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, Path, None] = None,
        *,
        dtype: Union[torch.dtype, str, None] = None,
        variant: Optional[str] = None,
        lcm: bool = False,
    ) -> "LatentDiffusion":
        """Load a diffusers-format SD 1.x / 2.x folder; with no path, the embedded default model.

        Never touches the network. ``dtype`` (a torch.dtype or its name, e.g. ``"float16"``) applies
        to every part; None loads float32. ``variant`` picks files such as ``*.fp16.safetensors``.
        A path to a single ``.safetensors`` / ``.ckpt`` file is passed on to :meth:`from_single_file`.
        ``lcm=True`` (no path) adds the default model's LCM-LoRA (``DEFAULT_LCM_LORA``, LoRA name
        ``lcm``): call it with ``**LCM_CALL`` (the ``lcm`` sampler, 4 steps, guidance 1).
        """
        dtype = torch_dtype(dtype)
        if path is not None and not isinstance(path, (str, Path)):
            raise InvalidInputError(f"from_pretrained takes a model folder path (str or Path) or None, got {type(path).__name__}")
        if lcm:
            if path is not None:
                raise InvalidInputError("lcm=True adds the default model's LCM-LoRA; for another model, load its "
                                        "LCM-LoRA with pipe.load_lora(PATH) and call with scheduler='lcm'")  # fmt: skip
            check_default_lcm_lora()
            pipe = cls.from_pretrained(dtype=dtype)
            pipe.load_lora(DEFAULT_LCM_LORA, name="lcm")
            return pipe
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
        dtype: Union[torch.dtype, str, None] = None,
    ) -> "LatentDiffusion":
        """Load an SD 1.x / 2.x checkpoint in the original single-file layout, offline.

        ``variant`` (``sd1``, ``sd2``, ``sd2-v``) overrides detection from keys and shapes. Every key
        is accounted for: with ``strict`` a missing, unexpected or misshapen key is an error naming
        it; ``strict=False`` prints the report and loads what fits. See ``models/single_file.py``.
        """
        from ..models.single_file import load_single_file

        if not isinstance(path, (str, Path)):
            raise InvalidInputError(f"from_single_file takes a file path (str or Path), got {type(path).__name__}")
        parts, arch, _ = load_single_file(path, variant=variant, strict=strict, dtype=torch_dtype(dtype))
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
        """Add a textual-inversion embedding (.safetensors / .pt; A1111 or diffusers layout; for SDXL
        ``clip_l`` / ``clip_g`` vectors, one set per text encoder) as ``token`` (default: the file's
        own token, or its name), usable in prompts."""
        from ..models.textual_inversion import add_embedding

        keys = ("clip_l", "clip_g") if self.sdxl else ("",)  # SDXL files hold one set of vectors per encoder
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        embedding = add_embedding([(key, tok, enc) for key, (tok, enc) in zip(keys, pairs) if enc is not None], path, token)
        self.embeddings.append(embedding)
        return embedding

    def load_controlnet(self, path: Union[str, Path], name: Optional[str] = None, *, strict: bool = True):
        """Add a ControlNet: a diffusers ``ControlNetModel`` folder, or one original-layout file
        (``control_model.*`` keys; ``.safetensors``, or ``.pth`` read safely), offline, every key accounted
        for (``strict=False`` loads what fits, with a report). Several can be loaded; each call then takes
        one ``control_image`` (and ``control_scale`` / ``control_start`` / ``control_end``) per loaded
        ControlNet and T2I-Adapter, in load order. ``name`` defaults to the file's name. Returns the record.
        ``"default"`` is the default model's ControlNet (a shape's silhouette, white on black), named "default".
        """
        if path == "default":
            path, name = default_controlnet(), name or "default"
        self._no_sdxl_controls("ControlNets")
        from ..models.controlnet import load_controlnet

        if not isinstance(path, (str, Path)):
            raise InvalidInputError(f"load_controlnet takes a folder or file path, got {type(path).__name__}")
        return self.controls.add(self, "controlnet", load_controlnet(path, self.unet, strict=strict), path, name)

    def load_t2i_adapter(self, path: Union[str, Path], name: Optional[str] = None):
        """Add a T2I-Adapter (a diffusers ``T2IAdapter`` folder); on the call it takes its control image like a
        ControlNet (``control_image`` etc., one per loaded ControlNet and adapter, in load order)."""
        self._no_sdxl_controls("T2I-Adapters")
        from ..models.adapters import load_t2i_adapter

        if not isinstance(path, (str, Path)):
            raise InvalidInputError(f"load_t2i_adapter takes a folder path, got {type(path).__name__}")
        return self.controls.add(self, "t2i_adapter", load_t2i_adapter(path, self.unet), path, name)

    def _no_sdxl_controls(self, what: str) -> None:
        """SDXL ControlNets and adapters also read the pooled embedding and time ids: not wired yet."""
        if self.sdxl:
            raise InvalidInputError(f"{what} work with SD 1.x / 2.x models so far; this is an SDXL model "
                                    "(SDXL ControlNets and adapters are not supported yet)")  # fmt: skip

    def unload_controlnet(self, name: Optional[str] = None) -> None:
        """Remove one ControlNet or T2I-Adapter by name, or all of them."""
        self.controls.remove(name)

    def load_ip_adapter(self, path: Union[str, Path], image_encoder: Union[str, Path, None] = None):
        """Install an IP-Adapter (``image_proj`` / ``ip_adapter`` weights: ``.bin`` read safely, or
        ``.safetensors``) and the folder of its CLIP vision encoder (``CLIPVisionModelWithProjection``),
        both local. Calls then take ``ip_image=`` (one, or one per prompt) and ``ip_scale=``; the model's
        weight hash stays the base model's (the adapter is recorded beside it)."""
        self._no_sdxl_controls("IP-Adapters")
        for value, what in ((path, "path"), (image_encoder, "image_encoder")):
            if value is not None and not isinstance(value, (str, Path)):
                raise InvalidInputError(f"load_ip_adapter: {what} must be a path, got {type(value).__name__}")
        return self.controls.load_ip_adapter(self, path, image_encoder)

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapter: the U-Net's attention is what it was before."""
        self.controls.unload_ip_adapter(self)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> "LatentDiffusion":
        """Random weights of architecture ``name`` (``tiny``, ``sd15``, ``sd21``); same seed, same weights."""
        if whole_number(seed) is None or not 0 <= seed <= MAX_SEED:
            raise InvalidInputError(f"the preset seed must be a whole number from 0 to 2**64-1, got {seed!r}")
        return cls(**architectures.build_components(name, seed), source={"preset": name, "seed": seed})

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write a diffusers-format folder (safetensors) that diffusers' StableDiffusionPipeline loads too.

        The weights are stored in the pipeline's dtype (``to(dtype=torch.float16)`` first halves the
        folder); every part loads in float32 by default, here and in diffusers, whatever the files hold.
        """
        return folder.save_folder(
            path,
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler_config=self.scheduler_config,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
        )

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None):
        """Move (and optionally cast) the networks and the loaded controls; returns the pipeline."""
        for _, module in self.networks():
            if device is not None:
                module.to(device)
            if dtype is None:
                continue
            if getattr(module, "_keep_in_fp32_modules", None):
                module.to(dtype)  # diffusers keeps the listed modules in float32
            else:  # plain cast: diffusers' .to() warns about fp32-only modules even when it lists none
                torch.nn.Module.to(module, dtype=dtype)
        self.controls.to(device, dtype)
        return self

    def optimize(self, compile: bool = True, **options) -> "LatentDiffusion":
        """The fast path, in place: half precision on CUDA, channels_last, fused QKV projections and
        ``torch.compile`` of the U-Net and the VAE decoder (see ``latentdiff.generation.optimize.FastOptions`` for
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
        return architectures.downscale_factor(self.vae)

    @property
    def sdxl(self) -> bool:
        """Whether this is an SDXL model (two text encoders or the refiner's one, micro-conditioning)."""
        return self.text_encoder_2 is not None

    @property
    def encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) of each text encoder the model has, in order."""
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        return [(tok, enc) for tok, enc in pairs if enc is not None]

    def networks(self) -> list[tuple[str, torch.nn.Module]]:
        """(attribute name, module) of every network the model has: U-Net, VAE, text encoder(s)."""
        nets = [("unet", self.unet), ("vae", self.vae)]
        return nets + [(name, getattr(self, name)) for name in architectures.TEXT_ENCODERS if getattr(self, name) is not None]

    @property
    def conditioning_width(self) -> int:
        """The width D of the text conditioning (B, L, D) the U-Net reads: the encoders' widths summed."""
        return sum(enc.config.hidden_size for _, enc in self.encoders)

    @property
    def pooled_width(self) -> Optional[int]:
        """SDXL: the width of the pooled text embedding (the second encoder's projection); else None."""
        return self.text_encoder_2.config.projection_dim if self.sdxl else None

    @property
    def time_id_count(self) -> Optional[int]:
        """SDXL: 6 micro-conditioning values (base) or 5 (refiner, with an aesthetic score); else None."""
        return architectures.time_id_count(self.unet, self.pooled_width) if self.sdxl else None

    def weight_hash(self) -> str:
        """Hash of all network weights (see ``metadata.weight_hash``).

        Cached until a weight is replaced, moved, cast or changed in place (training, LoRA fusing).
        An IP-Adapter's layers inside the U-Net are not part of it (recipes record the adapter beside it).
        """
        nets = tuple(self.networks())
        key = weights_fingerprint(m for _, m in nets)
        if self._hash is None or self._hash[0] != key:
            self._hash = (key, weight_hash(nets, skip=is_ip_adapter_key if self.controls.ip else None))
        return self._hash[1]

    def describe(self) -> dict[str, Any]:
        """Components, parameter counts, dtypes, scheduler config and weight hash (for ``latentdiff info``)."""
        parts = {}
        for name, module in self.networks():
            parts[name] = {
                "class": type(module).__name__,
                "parameters": sum(p.numel() for p in module.parameters()),
                "dtype": str(module.dtype).removeprefix("torch."),
                "device": str(module.device),
            }
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(self, name) is not None:
                parts[name] = {"class": type(getattr(self, name)).__name__, "vocab_size": len(getattr(self, name))}
        family = "SDXL refiner" if self.time_id_count == 5 else "SDXL" if self.sdxl else "SD"
        described = {
            "source": self.source,
            "family": family,
            "components": parts,
            "default_size": [self.default_size] * 2,
            "prediction_type": self.scheduler_config.get("prediction_type", "epsilon"),
            "scheduler": self.scheduler_config,
            "weight_hash": self.weight_hash(),
        }
        if self.controls.items or self.controls.ip:
            described["controls"] = self.controls.records() + ([self.controls.ip.record()] if self.controls.ip else [])
        return described

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
        prompt_2: Union[str, Sequence[str], None] = None,
        negative_prompt_2: Union[str, Sequence[str], None] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        original_size: Optional[tuple[int, int]] = None,
        crops_coords_top_left: Optional[tuple[int, int]] = None,
        target_size: Optional[tuple[int, int]] = None,
        negative_original_size: Optional[tuple[int, int]] = None,
        negative_crops_coords_top_left: Optional[tuple[int, int]] = None,
        negative_target_size: Optional[tuple[int, int]] = None,
        aesthetic_score: Optional[float] = None,
        negative_aesthetic_score: Optional[float] = None,
        denoising_start: Optional[float] = None,
        denoising_end: Optional[float] = None,
        cache_interval: Optional[int] = None,
        cache_branch: Optional[int] = None,
        control_image: Union[ImageInput, Sequence[Any], None] = None,
        control_scale: Union[float, Sequence[float]] = 1.0,
        control_start: Union[float, Sequence[float]] = 0.0,
        control_end: Union[float, Sequence[float]] = 1.0,
        ip_image: Union[ImageInput, Sequence[ImageInput], None] = None,
        ip_scale: float = 1.0,
    ) -> GenerationResult:
        """Text to image.

        Image order is prompt-major: all images of prompt 0, then of prompt 1, and so on. Image i
        is made from ``seeds[i]`` alone (see the seed contract in the README). ``scheduler`` is a
        name from ``latentdiff.generation.samplers.SAMPLERS``, or None for the model's own.
        ``callback`` is called after every step as ``callback(step_index, timestep, latents)``.
        ``progress``: True / False shows / hides a progress bar; None (the default) follows tqdm's
        convention: a bar (a widget in notebooks), hidden for all tqdm bars by ``TQDM_DISABLE=1``.
        Every call is bounded by ``self.limits`` (``latentdiff.checks.Limits``): more pixels,
        steps or images than those is refused before any work; raise a limit if the machine can.
        A result holding NaN or inf is an error (``NonFiniteResultError``) naming the likely cause.

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

        Control (after ``load_controlnet`` / ``load_t2i_adapter``; see ``control.py``): ``control_image``
        is the control picture (a path or PIL image; a list gives one per prompt), or with several
        controls loaded a list with one such entry per control, in load order; ``control_scale``,
        ``control_start`` and ``control_end`` (fractions of the steps the control acts on) are one value
        for all or a list with one per control. It combines with image-to-image, inpainting and hires
        (the control image is resized to each pass's size). ``ip_image`` (after ``load_ip_adapter``; one,
        or one per prompt) is an image prompt, weighted by ``ip_scale``.

        SDXL (the same call; the arguments below are refused by other models, as in diffusers'
        ``StableDiffusionXLPipeline``): ``prompt_2`` / ``negative_prompt_2`` go to the second text
        encoder (default: ``prompt`` / ``negative_prompt``); with no negative prompt at all a base
        model's unconditional embedding is zeros. ``pooled_prompt_embeds`` (P, D') go with
        ``prompt_embeds``. Micro-conditioning: ``original_size``, ``crops_coords_top_left`` and
        ``target_size`` (base) or ``aesthetic_score`` (refiner, default 6) and their ``negative_``
        forms (default: the positive value; ``negative_aesthetic_score`` 2.5); sizes are (height,
        width) and default to the image's. Base -> refiner: ``denoising_end`` = f stops after the
        first f of the schedule (take ``output_type="latent"``); the refiner, called with those
        latents as ``image=`` and ``denoising_start`` = f, runs the rest of the schedule without
        adding noise (``strength`` is then unused). Each image keeps its seed in both calls.

        Feature caching (DeepCache, ``feature_cache.py``): with ``cache_interval`` N the U-Net runs in
        full every N steps and only its shallow path in between, reusing its deep features;
        ``cache_branch`` (default 0, the shallowest) picks where the shallow path branches off.

        LCM-distilled U-Nets (``time_cond_proj_dim`` set) run with ``scheduler="lcm"`` and take
        ``guidance_scale`` as an embedding: there is no unconditional pass.
        """
        # 1. check the request and expand it to one entry per image (request.py)
        arguments = dict(locals())  # (the first statement: nothing but the arguments is local yet)
        arguments.pop("self")
        request = Request.resolve(self, **arguments)
        size = (request.height, request.width)

        # 2. encode the prompts, one group per length in chunks: [Conditioning(prompt indices, cond,
        #    uncond, pooled...)], cond / uncond (P, 77k, D); no unconditional pass without guidance
        groups = self._encode(request)

        # 3.-4. each image's start (noise, or its input image) from its own generator; denoise
        generators = make_generators(request.seeds)
        inputs, masks = request.per_image(request.images), request.per_image(request.masks)
        if isinstance(inputs, torch.Tensor):  # latents handed over from another call (B, C, h, w)
            inputs = inputs.to(self.device, self.unet.dtype)
        latents = self._sample(request, groups, generators, size, init=inputs, strength=request.strength, masks=masks)

        # 4b. resolution enhancement: upscale, then image-to-image at the larger size, with the
        #     same generators (their streams simply go on)
        if request.hires_scale is not None:
            big, start = self._upscale(latents, size, request.hires_scale, request.hires_upscale)
            latents = self._sample(request, groups, generators, big, init=start, strength=request.hires_strength)

        # 5. decode; an inpainted image keeps the input's pixels outside the mask. A NaN or inf
        #    anywhere is an error, never a black image (one flag read per call, after the work)
        self._check_finite(latents, request, "the denoised latents")
        keep = None
        if masks is not None and request.hires_scale is None and request.output_type != "latent":
            keep = known_pixels(self, inputs, masks, size)
        images = latents if request.output_type == "latent" else self._decode(latents, request.output_type, keep, request)

        # 6. every image's recipe (recipe.py)
        return GenerationResult(images=images, seeds=request.seeds, params=image_params(self, request))

    def _encode(self, request: Request) -> list[Conditioning]:
        """Conditioning grouped by length: one ``Conditioning`` per group of prompts.

        A prompt and its negative are padded to the longer of the two; prompts of equal length
        share a group, so nothing about an image depends on the other prompts of the call. SDXL
        concatenates its encoders' embeddings (B, L, D1 + D2) and adds the second one's pooled one.
        """
        prompts, negatives, guided = request.prompts, request.negatives, request.guided
        zero = request.zero_negative
        if request.prompt_embeds is not None:
            return [self._given_embeds(request)]
        # the texts each encoder reads: the first prompt, the second (SDXL; the refiner's one encoder reads the first)
        firsts = [prompts, request.prompts_2 or prompts][: len(self.encoders)]
        seconds = [negatives, request.negatives_2 or negatives][: len(self.encoders)]
        if self.embeddings:  # multi-vector tokens expand to one token per vector
            firsts = [[expand_tokens(p, self.embeddings) for p in texts] for texts in firsts]
            seconds = [[expand_tokens(q or "", self.embeddings) for q in texts] for texts in seconds]
        read = [(tok, [firsts[e]] + ([seconds[e]] if guided and not zero else [])) for e, (tok, _) in enumerate(self.encoders)]
        counts = [max(count_chunks(tok, texts[i] or "") for tok, lists in read for texts in lists) for i in range(len(prompts))]
        groups = []
        for k in sorted(set(counts), key=counts.index):
            idx = [i for i, c in enumerate(counts) if c == k]
            cond, pooled = self._embed([[texts[i] for i in idx] for texts in firsts], request.clip_skip, k)
            uncond = uncond_pooled = None
            if guided and zero:
                uncond, uncond_pooled = torch.zeros_like(cond), None if pooled is None else torch.zeros_like(pooled)
            elif guided:
                uncond, uncond_pooled = self._embed([[texts[i] or "" for i in idx] for texts in seconds], request.clip_skip, k)
            groups.append(Conditioning(idx, cond, uncond, pooled, uncond_pooled))
        return groups

    def _embed(self, texts: list[list[str]], clip_skip: int, chunks: int):
        """(embeddings (P, 77 * chunks, D), pooled (P, D') or None): ``texts[e]`` through encoder e."""
        parts, pooled = [], None
        for (tok, enc), own in zip(self.encoders, texts):
            last = self.sdxl and enc is self.text_encoder_2
            out = encode_prompts(tok, enc, own, clip_skip=clip_skip, num_chunks=chunks, penultimate=self.sdxl, pooled=last)
            if last:
                out, pooled = out
            parts.append(out)
        return torch.cat(parts, dim=-1), pooled

    def _given_embeds(self, request: Request) -> "Conditioning":
        """The conditioning of a call with ``prompt_embeds`` (and pooled ones, for SDXL)."""
        device, dtype = self.device, self.unet.dtype
        cond = request.prompt_embeds.to(device, dtype)
        pooled = None if request.pooled_prompt_embeds is None else request.pooled_prompt_embeds.to(device, dtype)
        everything = list(range(len(request.prompts)))
        if not request.guided:
            return Conditioning(everything, cond, None, pooled, None)
        if request.negative_prompt_embeds is not None:
            negative_pooled = request.negative_pooled_prompt_embeds
            return Conditioning(everything, cond, request.negative_prompt_embeds.to(device, dtype), pooled,
                                None if negative_pooled is None else negative_pooled.to(device, dtype))  # fmt: skip
        if request.zero_negative:
            return Conditioning(everything, cond, torch.zeros_like(cond), pooled, torch.zeros_like(pooled))
        chunks, rest = divmod(cond.shape[1], CHUNK + 2)
        if rest:
            raise InvalidInputError(
                f"prompt_embeds has length {cond.shape[1]}, not a multiple of {CHUNK + 2}; "
                "pass negative_prompt_embeds of the same shape"
            )
        negatives = [request.negatives, request.negatives_2 or request.negatives][: len(self.encoders)]
        uncond, uncond_pooled = self._embed([[q or "" for q in texts] for texts in negatives], request.clip_skip, chunks)
        return Conditioning(everything, cond, uncond.to(dtype), pooled, uncond_pooled)

    def _added_conditioning(self, request: Request, group: "Conditioning", size: tuple[int, int], n: int):
        """SDXL's added U-Net inputs for a group's images at ``size``: pooled text embeddings and
        micro-conditioning, unconditional rows first; None for other models."""
        if not self.sdxl:
            return None
        positive, negative = micro_conditioning(request, size, aesthetic=self.time_id_count == 5)
        rows = len(group.indices) * n
        dtype, device = self.unet.dtype, self.device
        text_embeds = group.pooled.repeat_interleave(n, dim=0)
        time_ids = torch.tensor([positive], dtype=dtype, device=device).repeat(rows, 1)  # (B, 5 or 6)
        if group.uncond is not None:
            text_embeds = torch.cat([group.uncond_pooled.repeat_interleave(n, dim=0), text_embeds])
            time_ids = torch.cat([torch.tensor([negative], dtype=dtype, device=device).repeat(rows, 1), time_ids])
        return {"text_embeds": text_embeds.to(device, dtype), "time_ids": time_ids}

    def _sample(self, request: Request, groups, generators, size, *, init=None, strength=None, masks=None):
        """Denoise every group; returns z_0 for all images (B, C, h, w), in image order.

        ``init`` None starts from noise; a list of PIL images (one per image) or a latent batch
        (B, C, h, w) starts image-to-image at ``strength`` (or, for a hand-off, at
        ``request.denoising_start`` without new noise); with ``masks`` too, it inpaints.
        """
        f, n = self.vae_scale_factor, request.n
        shape = (self.vae.config.latent_channels, size[0] // f, size[1] // f)
        finished: list[Optional[torch.Tensor]] = [None] * len(generators)
        for group in groups:
            images = [i * n + j for i in group.indices for j in range(n)]  # prompt-major image order
            gens = [generators[m] for m in images]
            sched = fresh_scheduler(self, request.scheduler)
            sched.set_timesteps(request.steps, device=self.device)
            inpaint = None
            if init is None:
                latents = initial_latents(gens, shape, device=self.device, dtype=self.unet.dtype) * sched.init_noise_sigma
                timesteps = sched.timesteps
            elif masks is not None:
                start = [init[m] for m in images]
                latents, timesteps, inpaint = inpaint_start(self, start, [masks[m] for m in images], size, gens, sched,
                                                            request.steps, strength)  # fmt: skip
            else:
                start = init[images] if isinstance(init, torch.Tensor) else [init[m] for m in images]
                latents, timesteps = img2img_start(self, start, size, gens, sched, request.steps, strength,
                                                   denoising_start=request.denoising_start)  # fmt: skip
            if request.denoising_end is not None:
                timesteps = end_timesteps(sched, timesteps, request.denoising_end)
            timestep_cond = None
            if request.guidance_embedding_dim is not None:  # LCM-distilled U-Net: (B, D), no unconditional pass
                timestep_cond = guidance_embedding([request.guidance_scale] * len(images), request.guidance_embedding_dim)
            with self._feature_cache(request):
                latents = denoise(
                    self.unet, sched, latents, group.cond.repeat_interleave(n, dim=0),
                    None if group.uncond is None else group.uncond.repeat_interleave(n, dim=0),
                    guidance_scale=request.guidance_scale, guidance_rescale=request.guidance_rescale, eta=request.eta,
                    generators=gens, timesteps=timesteps, inpaint=inpaint, callback=request.callback,
                    progress=request.progress, added=self._added_conditioning(request, group, size, n),
                    timestep_cond=timestep_cond, control=self.controls.prepare(self, request, images, size),
                )  # fmt: skip
            for m, z in zip(images, latents):
                finished[m] = z
        return torch.stack(finished)

    def _feature_cache(self, request: Request):
        """The U-Net feature cache for one denoising run (``feature_cache.py``), or nothing without one."""
        if request.cache_interval is None:
            return contextlib.nullcontext()
        from .feature_cache import FeatureCache

        return FeatureCache(self.unet, request.cache_interval, request.cache_branch)

    def _check_finite(self, values: torch.Tensor, request: Request, what: str) -> None:
        """Raise ``NonFiniteResultError`` naming the likely cause if ``values`` hold NaN or inf."""
        if bool(torch.isfinite(values).all()):
            return
        bad = (~torch.isfinite(values.flatten(1))).any(dim=1).nonzero().flatten().tolist()
        causes = []
        if request.guidance_scale > 30:
            causes.append(f"guidance_scale {request.guidance_scale:g} is extreme (7.5 is usual)")
        causes += [f"LoRA {name!r} at scale {a.report.scale:g}" for name, a in self.loras.adapters.items()
                   if abs(a.report.scale) > 4]  # fmt: skip
        if self.dtype in (torch.float16, torch.bfloat16):
            causes.append(f"{str(self.dtype).removeprefix('torch.')} arithmetic overflowed: try float32 (--dtype float32)")
        if self.loras.adapters and not causes:
            causes.append(f"the LoRAs ({', '.join(self.loras.adapters)}) do not suit this model")
        if not causes:
            causes.append("the model's weights (a damaged file, or one made for another architecture)")
        raise NonFiniteResultError(
            f"{what} of image{'s' if len(bad) > 1 else ''} {', '.join(str(i) for i in bad[:8])} hold NaN or "
            f"infinite values, so no image was made; likely cause: {'; '.join(causes)}"
        )

    def _upscale(self, latents: torch.Tensor, size: tuple[int, int], factor: float, mode: str):
        """The hires pass's size and start: latents upscaled bilinearly (B, C, h', w'), or the
        decoded images Lanczos-resized (PIL, to be encoded again)."""
        f = self.vae_scale_factor
        big = hires_size(size, factor, f)
        if mode == "latent":
            return big, torch.nn.functional.interpolate(latents, size=(big[0] // f, big[1] // f), mode="bilinear")
        return big, [im.resize((big[1], big[0]), Image.LANCZOS) for im in self._decode(latents, "pil")]

    def _decode(self, latents: torch.Tensor, output_type: str, keep=None, request: Optional[Request] = None):
        """z_0 (B, C, h, w) -> images: (x / scaling_factor) through the VAE decoder, then [-1, 1] -> [0, 1].

        ``keep`` = (mask, pixels): outside the mask the decoded image is replaced by ``pixels``.
        """
        decoded = vae_decode(self.vae, latents, self.vae_options)  # (B, 3, H, W) in [-1, 1]
        if request is not None:
            self._check_finite(decoded, request, "the decoded pixels")
        if keep is not None:
            mask, known = keep
            decoded = mask * decoded + (1 - mask) * known
        return pixel_processor(self.vae_scale_factor).postprocess(decoded, output_type=output_type)
