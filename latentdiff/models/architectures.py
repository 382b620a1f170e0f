"""Architectures: one record type for every model shape, and the one builder of its parts.

An :class:`Architecture` is only configuration (diffusers / transformers config dicts); the parts
are the libraries' own classes, made by :func:`build_components`. Two registries hold records:

- :data:`PRESETS`, what ``from_preset`` / ``--preset`` build with random weights: ``tiny`` and
  ``tiny-sdxl`` / ``tiny-sdxl-refiner`` for tests, ``small`` and ``mini`` for training from
  scratch, ``sd15``, ``sd21``, ``sdxl`` and ``sdxl-refiner`` the real Stable Diffusion 1.5, 2.1
  (768-v), SDXL base 1.0 and refiner 1.0 shapes, for benchmarks;
- :data:`VARIANTS`, what a single-file checkpoint may be (``sd1``, ``sd2``, ``sd2-v``, ``sdxl``,
  ``sdxl-refiner``), derived from those presets, so that no configuration is ever downloaded.

An SDXL record has a second text encoder (``text_encoder_2``: OpenCLIP bigG with its projection,
a transformers ``CLIPTextModelWithProjection``) and its tokenizer; the refiner has no first one
(``text_encoder`` None). Its U-Net takes the pooled text embedding and the micro-conditioning
through diffusers' ``addition_embed_type="text_time"``.

This module imports torch, diffusers and transformers only when it builds: the command line reads
the names without them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from ..errors import InvalidInputError
from .tokenizer import EOS, load_clip_tokenizer

# The scheduler_config.json the SD 1.5 release ships (PNDM with PLMS steps only, "scaled_linear"
# betas). Like the real file it leaves prediction_type and timestep_spacing to each scheduler's
# default, so every named sampler is tested the way real models exercise it.
_SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_SD_UNET_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
}


# The from-scratch presets' shared layout for 64x64 images with 16x16x4 latents.
_SMALL_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128, 128],
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
_SMALL_VAE = {
    **_SD_VAE,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "sample_size": 64,
}


# SDXL (Podell et al. 2023; Stability's sd_xl_base.yaml / sd_xl_refiner.yaml in diffusers' terms)
_SDXL_SCHEDULER = {
    **_SD_SCHEDULER,
    "_class_name": "EulerDiscreteScheduler",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "prediction_type": "epsilon",
}
_SDXL_VAE = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
_SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "addition_embed_type_num_heads": 64,
    "projection_class_embeddings_input_dim": 2816,  # 6 micro-conditioning values x 256 + pooled 1280
}
_SDXL_REFINER_UNET = {
    **_SDXL_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [384, 768, 1536, 1536],
    "transformer_layers_per_block": 4,
    "attention_head_dim": [6, 12, 24, 24],
    "cross_attention_dim": 1280,
    "projection_class_embeddings_input_dim": 2560,  # 5 values (sizes, crop, aesthetic score) x 256 + 1280
}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
_OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                  "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
_OPENCLIP_PAD = {"pad_token": "!"}  # OpenCLIP's tokenizer pads with id 0


def _tiny_sdxl_unet(cross_attention_dim: int, time_values: int) -> dict[str, Any]:
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 64],
            "layers_per_block": 1, "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4],
            "cross_attention_dim": cross_attention_dim, "use_linear_projection": True, "norm_num_groups": 32,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 8 * time_values + 48}  # fmt: skip


def _text_encoder(width: int, layers: int) -> dict[str, Any]:
    return {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": 4, "projection_dim": width, "hidden_act": "quick_gelu"}  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build a model's parts: each part's config, as a diffusers folder holds it."""

    name: str
    unet: dict[str, Any]  # UNet2DConditionModel config
    vae: dict[str, Any]  # AutoencoderKL config
    text_encoder: Optional[dict[str, Any]]  # CLIPTextConfig entries (vocabulary size and special ids come from
    # the tokenizer); None for a model without a first encoder (the SDXL refiner)
    scheduler: dict[str, Any]  # scheduler_config.json
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"pad_token": EOS})  # load_clip_tokenizer options
    text_encoder_2: Optional[dict[str, Any]] = None  # SDXL: CLIPTextModelWithProjection's config entries
    tokenizer_2: dict[str, Any] = field(default_factory=lambda: dict(_OPENCLIP_PAD))
    added_tokens: tuple[str, ...] = ()  # tokens beyond CLIP's vocabulary (textual inversions saved into a file)
    description: str = ""  # for messages: "SD 1.x (CLIP ViT-L, epsilon, 512)"
    reason: str = ""  # why a checkpoint was read as this architecture (given, embedded, detected)

    def with_overrides(self, overrides: Optional[dict[str, dict[str, Any]]]) -> "Architecture":
        """This architecture with single config entries replaced: ``{"unet": {...}, "vae": {...},
        "text_encoder": {...}}`` (a from-scratch training run's ``[model.unet_config]`` etc.)."""
        changed = self
        for part, values in (overrides or {}).items():
            if part not in ("unet", "vae", "text_encoder", "text_encoder_2"):
                raise InvalidInputError(f"architecture overrides name unet, vae, text_encoder or text_encoder_2, not {part!r}")
            if values and getattr(changed, part) is None:
                raise InvalidInputError(f"architecture {changed.name!r} has no {part} to override")
            if values:
                changed = replace(changed, **{part: {**getattr(changed, part), **values}})
        return changed


_TINY_VAE = {**_SD_VAE, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
                    "sample_size": 64}  # fmt: skip

PRESETS: dict[str, Architecture] = {
    "tiny": Architecture(
        name="tiny",
        unet={
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 32,
        },
        vae=_TINY_VAE,
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
        },
        scheduler=_SD_SCHEDULER,
    ),
    # A small model for training from scratch on 64-128 px images: a VAE that downsamples by 4
    # (64x64 pixels -> 16x16x4 latents, so fine detail survives), a three-level U-Net, and a
    # 6-layer text encoder over the full CLIP vocabulary. About 27M parameters in all.
    "small": Architecture(
        name="small",
        unet={**_SMALL_UNET, "layers_per_block": 2, "cross_attention_dim": 256},
        vae=_SMALL_VAE,
        text_encoder=_text_encoder(256, 6),
        scheduler=_SD_SCHEDULER,
    ),
    # The embedded default model's architecture (latentdiff/assets/default_model): the `small` layout
    # cut to fit 25 MB in fp16 with its tokenizer (~10M parameters, most of them the 64-wide token
    # embedding of the full CLIP vocabulary), a lighter VAE with 8 latent channels, and a DDIM scheduler
    # config for v-prediction with zero terminal SNR, which is how it is trained
    # (training/configs/default-model.toml).
    "mini": Architecture(
        name="mini",
        unet={**_SMALL_UNET, "layers_per_block": 1, "cross_attention_dim": 64, "in_channels": 8, "out_channels": 8},
        # One GroupNorm group: with one group per channel (or two), a flat-coloured image normalises to a
        # constant and its colour is lost; 8 latent channels at 4x downsampling keep 64x64 emoji above 30 dB
        # (the recipe search is in the default model's card).
        vae={**_SMALL_VAE, "block_out_channels": [16, 32, 64], "norm_num_groups": 1, "latent_channels": 8},
        text_encoder=_text_encoder(64, 4),
        scheduler={
            **_SD_SCHEDULER,
            "_class_name": "DDIMScheduler",
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "set_alpha_to_one": False,
        },
    ),
    "sd15": Architecture(
        name="sd15",
        unet={**_SD_UNET_BLOCKS, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae=_SD_VAE,
        text_encoder={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        scheduler=_SD_SCHEDULER,
    ),
    "sd21": Architecture(
        name="sd21",
        unet={
            **_SD_UNET_BLOCKS,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        vae={**_SD_VAE, "sample_size": 768},
        # SD 2.x takes the penultimate layer of OpenCLIP ViT-H (24 layers), stored as 23 layers.
        text_encoder={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "projection_dim": 512,
            "hidden_act": "gelu",
        },
        scheduler={**_SD_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
        tokenizer={"pad_token": "!"},
    ),
    "sdxl": Architecture(name="sdxl", unet=_SDXL_UNET, vae=_SDXL_VAE, text_encoder=_CLIP_L,
                         text_encoder_2=_OPENCLIP_BIGG, scheduler=_SDXL_SCHEDULER),
    # the refiner conditions on the second encoder alone, and on an aesthetic score instead of a target size
    "sdxl-refiner": Architecture(name="sdxl-refiner", unet=_SDXL_REFINER_UNET, vae=_SDXL_VAE, text_encoder=None,
                                 text_encoder_2=_OPENCLIP_BIGG, scheduler=_SDXL_SCHEDULER),
    # SDXL's layout at test size: two 3-layer encoders (so clip skip 1 exists), 32 and 48 wide (of other widths,
    # as in SDXL, which is how diffusers' single-file loader tells them apart), a two-level U-Net
    "tiny-sdxl": Architecture(
        name="tiny-sdxl", unet=_tiny_sdxl_unet(80, 6), vae={**_TINY_VAE, "scaling_factor": 0.13025},
        text_encoder={**_text_encoder(32, 3), "num_attention_heads": 4},
        text_encoder_2={**_text_encoder(48, 3), "hidden_act": "gelu"}, scheduler=_SDXL_SCHEDULER,
    ),
    "tiny-sdxl-refiner": Architecture(
        name="tiny-sdxl-refiner", unet=_tiny_sdxl_unet(48, 5), vae={**_TINY_VAE, "scaling_factor": 0.13025},
        text_encoder=None, text_encoder_2={**_text_encoder(48, 3), "hidden_act": "gelu"}, scheduler=_SDXL_SCHEDULER,
    ),
}


def _variants() -> dict[str, Architecture]:
    sd15, sd21 = PRESETS["sd15"], PRESETS["sd21"]
    eps_scheduler = {**sd15.scheduler, "prediction_type": "epsilon"}
    return {
        "sd1": replace(sd15, name="sd1", description="SD 1.x (CLIP ViT-L, epsilon, 512)", scheduler=eps_scheduler),
        # SD 2.0 / 2.1 base: the 768-v U-Net trained at 512 with epsilon prediction
        "sd2": replace(sd21, name="sd2", description="SD 2.x base (OpenCLIP ViT-H, epsilon, 512)",
                       unet={**sd21.unet, "sample_size": 64}, vae={**sd21.vae, "sample_size": 512},
                       scheduler=eps_scheduler),
        "sd2-v": replace(sd21, name="sd2-v", description="SD 2.x 768-v (OpenCLIP ViT-H, v-prediction, 768)"),
        "sdxl": replace(PRESETS["sdxl"], description="SDXL base (CLIP ViT-L + OpenCLIP bigG, epsilon, 1024)"),
        "sdxl-refiner": replace(PRESETS["sdxl-refiner"], description="SDXL refiner (OpenCLIP bigG, epsilon, 1024)"),
    }  # fmt: skip


VARIANTS = _variants()


def get_preset(name: str) -> Architecture:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def build_components(
    architecture: Union[str, Architecture],
    seed: int = 0,
    overrides: Optional[dict[str, dict[str, Any]]] = None,
    *,
    empty: bool = False,
) -> dict[str, Any]:
    """The parts of ``architecture`` (a preset name or a record), as ``LatentDiffusion(**parts)`` takes them.

    Weights are random, drawn from ``seed`` (the same seed gives the same weights; the caller's
    global RNG state is left untouched), or with ``empty`` not made at all (parameters on the meta
    device, buffers real: a single-file load assigns the file's tensors). ``overrides`` replace
    single config entries (:meth:`Architecture.with_overrides`). Every part is in eval mode and
    frozen.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch = get_preset(architecture) if isinstance(architecture, str) else architecture
    arch = arch.with_overrides(overrides)

    def part(make):
        # Each part draws from its own stream seeded with `seed`, so it depends only on its own config
        # and the seed: a from-scratch run that changes its U-Net keeps the same VAE (and VAE stage).
        with init_empty_weights() if empty else _seeded(seed):
            return make()

    parts: dict[str, Any] = {"unet": part(lambda: UNet2DConditionModel.from_config(_settings(arch.unet))),
                             "vae": part(lambda: AutoencoderKL.from_config(_settings(arch.vae)))}  # fmt: skip
    for suffix, config, tokenizer_options, cls in (("", arch.text_encoder, arch.tokenizer, CLIPTextModel),
                                                  ("_2", arch.text_encoder_2, arch.tokenizer_2, CLIPTextModelWithProjection)):  # fmt: skip
        if config is None:
            parts["text_encoder" + suffix] = parts["tokenizer" + suffix] = None
            continue
        tokenizer = load_clip_tokenizer(**tokenizer_options)
        if arch.added_tokens:
            tokenizer.add_tokens(list(arch.added_tokens))
        text_config = text_encoder_config(tokenizer, config)
        parts["text_encoder" + suffix] = part(lambda: cls(text_config))
        parts["tokenizer" + suffix] = tokenizer
    for name in TEXT_ENCODERS + ("unet", "vae"):
        if parts[name] is not None:
            parts[name].eval().requires_grad_(False)
    parts["scheduler_config"] = dict(arch.scheduler)
    return parts


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the attribute names, as diffusers' pipelines have them


def text_encoder_config(tokenizer, entries: dict[str, Any]):
    """A ``CLIPTextConfig`` from ``entries`` with the vocabulary size and special ids of ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **entries,
    })  # fmt: skip


def is_sdxl(unet_config) -> bool:
    """Whether a U-Net takes SDXL's added conditioning (pooled text embedding and micro-conditioning)."""
    config = unet_config if isinstance(unet_config, dict) else unet_config.config
    return config.get("addition_embed_type") == "text_time"


def time_id_count(unet_config, pooled_dim: int) -> int:
    """How many micro-conditioning values an SDXL U-Net reads: 6 (base: original size, crop corner,
    target size) or 5 (refiner: original size, crop corner, aesthetic score); from its input width."""
    config = unet_config if isinstance(unet_config, dict) else unet_config.config
    values, rest = divmod(config["projection_class_embeddings_input_dim"] - pooled_dim, config["addition_time_embed_dim"])
    if rest or values not in (5, 6):
        raise InvalidInputError(
            f"this U-Net's added conditioning ({config['projection_class_embeddings_input_dim']} wide) does not fit a "
            f"{pooled_dim}-wide pooled text embedding with 5 or 6 micro-conditioning values: the parts do not belong together"
        )
    return values


def downscale_factor(module) -> int:
    """How much a VAE (or U-Net) shrinks an image's side: each level of ``block_out_channels`` but
    the last halves it (8 for Stable Diffusion's VAE). ``module`` may also be a config dict."""
    config = module if isinstance(module, dict) else module.config
    return 2 ** (len(config["block_out_channels"]) - 1)


def size_rules(vae_config: dict, unet_config: dict) -> tuple[int, int]:
    """(pixels per latent cell, native side in pixels) of a model, from its VAE and U-Net configs."""
    factor = downscale_factor(vae_config)
    return factor, int(unet_config["sample_size"]) * factor


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """A config without the bookkeeping keys diffusers writes (``_class_name``, ``_diffusers_version``)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@contextlib.contextmanager
def _seeded(seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
