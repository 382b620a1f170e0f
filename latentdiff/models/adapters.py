"""T2I-Adapter and IP-Adapter weights, read offline from local paths.

- T2I-Adapter (Mou et al. 2023): a diffusers ``T2IAdapter`` folder (``config.json`` + weights). Its
  features are added inside the U-Net's encoder blocks, so its widths must be the U-Net's.
- IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"): one file in the
  ``image_proj`` / ``ip_adapter`` layout (the releases' ``.bin`` pickle ``{"image_proj": ...,
  "ip_adapter": ...}``, read with ``weights_only``, or a ``.safetensors`` file with ``image_proj.`` /
  ``ip_adapter.`` key prefixes), plus a CLIP vision encoder folder (transformers'
  ``CLIPVisionModelWithProjection``). diffusers' own U-Net loader installs it (image projection and
  IP attention processors), after every ``ip_adapter`` key has been matched to a cross-attention layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import InvalidInputError, MissingFileError
from .safe_load import read_tensor_file

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_t2i_adapter(path, unet):
    """A ``T2IAdapter`` (float32, eval, frozen) from a diffusers folder, checked against ``unet``."""
    from diffusers import T2IAdapter

    root = Path(path).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"T2I-Adapter {root} is not a folder; give a diffusers T2IAdapter folder "
                               "(config.json + diffusion_pytorch_model.safetensors)")  # fmt: skip
    if not (root / "config.json").is_file() or not any((root / w).is_file() for w in _WEIGHTS):
        raise MissingFileError(f"T2I-Adapter folder {root} needs config.json and {_WEIGHTS[0]}")
    try:
        adapter = T2IAdapter.from_pretrained(root, local_files_only=True, torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a damaged folder fails in many ways
        raise InvalidInputError(f"could not load the T2I-Adapter in {root} ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:200]})") from None  # fmt: skip
    widths, blocks = list(adapter.config.channels), list(unet.config.block_out_channels)
    if widths != blocks[: len(widths)] or len(widths) != len(blocks):
        raise InvalidInputError(f"the T2I-Adapter {root} has widths {widths}, this model's U-Net {blocks}: it was made "
                                "for another base model")  # fmt: skip
    if "CrossAttn" not in unet.config.down_block_types[0]:
        # diffusers adds the first feature before the first block's downsampler only in a cross-attention block
        raise InvalidInputError("T2I-Adapters need a U-Net whose first block has cross-attention (as SD's have)")
    return adapter.eval().requires_grad_(False)


def read_ip_adapter(path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from an IP-Adapter file; any other key is an error."""
    path = Path(path).expanduser()
    contents, _ = read_tensor_file(path)
    if isinstance(contents.get("image_proj"), dict) and isinstance(contents.get("ip_adapter"), dict):
        state = {"image_proj": dict(contents["image_proj"]), "ip_adapter": dict(contents["ip_adapter"])}
        other = sorted(k for k in contents if k not in state)
    else:
        state = {"image_proj": {}, "ip_adapter": {}}
        other = []
        for key, value in contents.items():
            part, dot, rest = key.partition(".")
            if dot and part in state and isinstance(value, torch.Tensor):
                state[part][rest] = value
            else:
                other.append(key)
    if not state["image_proj"] or not state["ip_adapter"]:
        raise InvalidInputError(f"{path} is not an IP-Adapter: it needs image_proj and ip_adapter weights")
    if other:
        raise InvalidInputError(f"{path} has {len(other)} keys outside image_proj / ip_adapter "
                                f"({', '.join(other[:5])}); IP-Adapter variants with LoRAs (FaceID) are not supported")  # fmt: skip
    return state


def check_ip_keys(state: dict, unet, path) -> None:
    """Every ``ip_adapter`` key must be one diffusers' loader reads: ``N.to_k_ip.weight`` / ``N.to_v_ip.weight``
    for the N-th attention layer (1, 3, 5, ...: the cross-attention ones), and none missing."""
    names = list(unet.attn_processors)
    # diffusers numbers processors from 1 and counts only cross-attention ones, two at a time
    cross = [i for i, name in enumerate(names) if not name.endswith("attn1.processor")]
    wanted = {f"{2 * j + 1}.to_{kv}_ip.weight" for j in range(len(cross)) for kv in "kv"}
    have = set(state["ip_adapter"])
    missing, unexpected = sorted(wanted - have, key=_natural), sorted(have - wanted, key=_natural)
    if missing or unexpected:
        raise InvalidInputError(
            f"the IP-Adapter {path} does not fit this model's U-Net ({len(cross)} cross-attention layers): "
            + "; ".join(f"{len(keys)} {what}: {', '.join(keys[:4])}" for what, keys in (("missing", missing),
                                                                                     ("unexpected", unexpected)) if keys)
            + ". Is it made for this model's family?"
        )  # fmt: skip


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def load_image_encoder(path):
    """(CLIPVisionModelWithProjection in float32, the CLIPImageProcessor diffusers pairs with it) from a folder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        raise MissingFileError(f"image encoder {root} is not a CLIP vision model folder (no config.json)")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(root, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise InvalidInputError(f"could not load the CLIP image encoder in {root} ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:200]})") from None  # fmt: skip
    size = encoder.config.image_size
    # what diffusers' load_ip_adapter makes when the pipeline has no feature extractor of its own
    processor = CLIPImageProcessor(size=size, crop_size=size)
    return encoder.eval().requires_grad_(False), processor
