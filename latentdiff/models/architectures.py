"""Named architectures: the configuration of every component, and random-weight builders.

A preset is only configuration (diffusers / transformers config dicts); the components are
the libraries' own classes. ``tiny`` is for tests; ``sd15`` and ``sd21`` are the real
Stable Diffusion 1.5 and 2.1 (768-v) shapes, for benchmarks and training from scratch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

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


def _text_encoder(width: int, layers: int) -> dict[str, Any]:
    return {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": 4, "projection_dim": width, "hidden_act": "quick_gelu"}  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """Everything needed to build one architecture with random weights."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"pad_token": EOS})


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
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
        vae={
            **_SD_VAE,
            "block_out_channels": [8, 16, 16, 16],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 64,
        },
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
    "small": Preset(
        name="small",
        unet={**_SMALL_UNET, "layers_per_block": 2, "cross_attention_dim": 256},
        vae=_SMALL_VAE,
        text_encoder=_text_encoder(256, 6),
        scheduler=_SD_SCHEDULER,
    ),
    # The embedded default model's architecture (latentdiff/assets/default_model): the `small` layout
    # cut to fit 25 MB in fp16 with its tokenizer (~10M parameters, most of them the 64-wide token
    # embedding of the full CLIP vocabulary), and a DDIM scheduler config for v-prediction with
    # zero terminal SNR, which is how it is trained (training/configs/default-model.toml).
    "mini": Preset(
        name="mini",
        unet={**_SMALL_UNET, "layers_per_block": 1, "cross_attention_dim": 64},
        vae=_SMALL_VAE,
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
    "sd15": Preset(
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
    "sd21": Preset(
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
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def build_components(name: str, seed: int = 0, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Random-weight components of preset ``name``; the same ``seed`` gives the same weights.

    ``overrides`` ({"unet": {...}, "vae": {...}, "text_encoder": {...}}) replace single entries of the
    preset's configs (a from-scratch training run's ``[model.unet_config]`` etc.). The caller's global
    RNG state is left untouched (weights are drawn inside ``fork_rng``).
    """
    from dataclasses import replace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = get_preset(name)
    for part, values in (overrides or {}).items():
        if part not in ("unet", "vae", "text_encoder"):
            raise InvalidInputError(f"architecture overrides name unet, vae or text_encoder, not {part!r}")
        if values:
            preset = replace(preset, **{part: {**getattr(preset, part), **values}})
    tokenizer = load_clip_tokenizer(**preset.tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **preset.text_encoder,
    )
    with _seeded(seed):
        # One stream of draws, always in this order, so each part depends only on (name, seed).
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
        text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": dict(preset.scheduler),
    }


@contextlib.contextmanager
def _seeded(seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
