"""The original key layouts of SD 1.x / 2.x (``ldm``) and SDXL (``sgm``) checkpoints, mapped to diffusers' names.

One list of :class:`Rule` s, built from a model's own parameter names and configuration, serves
both directions (file -> model when loading, model -> file when exporting), so a round trip is
the identity by construction. The original layout (CompVis ``ldm``, Stability's SD 2 release):

=====================================  =========================================================
``model.diffusion_model.*``            U-Net (``input_blocks`` / ``middle_block`` / ``output_blocks``)
``first_stage_model.*``                VAE (``encoder.down.I.block.J``, ``decoder.up.I`` in reverse order,
                                       mid-block attention as 1x1 convolutions)
``cond_stage_model.transformer.*``     SD 1.x: OpenAI CLIP ViT-L/14 text model, transformers' names
``cond_stage_model.model.*``           SD 2.x: OpenCLIP ViT-H text tower (``resblocks``, fused q/k/v)
``conditioner.embedders.0.transformer``  SDXL base: the CLIP ViT-L text model (transformers' names)
``conditioner.embedders.1.model.*``    SDXL base: OpenCLIP bigG (as SD 2.x's, plus ``text_projection``,
                                       stored transposed); the refiner's only encoder is ``embedders.0``
=====================================  =========================================================

SDXL's U-Net adds ``label_emb.0.0`` / ``label_emb.0.2`` (diffusers' ``add_embedding``), the
projection of the pooled text embedding and micro-conditioning.

diffusers' ``single_file_utils`` does the file -> model direction for its own loader; it is used
here only as an independent check in the tests, because it drops keys it does not recognise and
has no export direction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
CLIP_PREFIX = TEXT + "transformer.text_model."
OPENCLIP_PREFIX = TEXT + "model."
SDXL_TEXT = "conditioner.embedders."


def text_prefixes(sdxl: bool, refiner: bool = False) -> dict[str, str]:
    """Where each text encoder's tensors live in a single file: part -> key prefix (CLIP ViT-L's
    prefixes include ``text_model.``, OpenCLIP's are the tower's root)."""
    if not sdxl:
        return {"text_encoder": TEXT}
    if refiner:
        return {"text_encoder_2": SDXL_TEXT + "0.model."}
    return {"text_encoder": SDXL_TEXT + "0.transformer.text_model.", "text_encoder_2": SDXL_TEXT + "1.model."}


@dataclass(frozen=True)
class Rule:
    """One tensor in the file <-> one or more tensors of the model.

    ``targets`` are (part, key) pairs; several targets mean the file tensor is their concatenation
    along dim 0 (OpenCLIP's fused ``in_proj`` = q, k, v). Shapes may differ only by trailing 1s
    (a 1x1 convolution in the file, a linear layer in the model).
    """

    file_key: str
    targets: tuple[tuple[str, str], ...]
    transpose: bool = False  # the file stores the matrix transposed (OpenCLIP's text_projection: x @ P)


class LayoutError(ValueError):
    """A model key that has no place in the original layout (an architecture it cannot express)."""


# -- U-Net -----------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def _resnet_tail(tail: str) -> str:
    layer, _, rest = tail.partition(".")
    if layer not in _RESNET:
        raise LayoutError(tail)
    return f"{_RESNET[layer]}.{rest}"


def unet_key(key: str, config) -> str:
    """diffusers U-Net key -> original key (without the ``model.diffusion_model.`` prefix).

    In the original U-Net every layer is a numbered ``TimestepEmbedSequential``: ``input_blocks.0``
    is conv_in, then each level contributes ``layers_per_block`` (resnet [, attention]) layers and,
    except the last, a downsampler; the middle block is (resnet, attention, resnet); each output
    level has ``layers_per_block + 1`` layers, the last of which also holds the upsampler.
    """
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise LayoutError("per-level layers_per_block has no original-layout equivalent")
    for new, old in _UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        level, kind, j, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "downsamplers":
            if not tail.startswith("conv."):
                raise LayoutError(key)
            return f"input_blocks.{(level + 1) * (per + 1)}.0.op.{tail[5:]}"
        index = 1 + level * (per + 1) + j
        return f"input_blocks.{index}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"input_blocks.{index}.1.{tail}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, tail = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.{2 * j}.{_resnet_tail(tail)}" if kind == "resnets" else f"middle_block.1.{tail}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        level, kind, j, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "upsamplers":
            if not tail.startswith("conv."):
                raise LayoutError(key)
            # after the resnet (and the attention, on levels that have one)
            slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
            return f"output_blocks.{level * (per + 1) + per}.{slot}.{tail}"
        index = level * (per + 1) + j
        return (
            f"output_blocks.{index}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"output_blocks.{index}.1.{tail}"
        )
    raise LayoutError(key)


# -- ControlNet ------------------------------------------------------------------------------------
# The original ControlNet (Zhang et al. 2023, lllyasviel/ControlNet's cldm.py) is a copy of the U-Net's
# encoder under ``control_model.``: the same ``time_embed`` / ``input_blocks`` / ``middle_block`` names,
# plus ``input_hint_block`` (the conditioning image's encoder: convolutions at even indices, SiLUs
# between), ``zero_convs.N.0`` (one 1x1 zero convolution per input block) and ``middle_block_out.0``.

CONTROL = "control_model."


def controlnet_key(key: str, config) -> str:
    """diffusers ControlNetModel key -> original key (without ``control_model.``)."""
    m = re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.+)", key)
    if m:
        blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)  # (conv, strided conv) per level
        index = 0 if m.group(1) == "conv_in" else 2 * (blocks + 1) if m.group(1) == "conv_out" else 2 * (int(m.group(2)) + 1)
        return f"input_hint_block.{index}.{m.group(3)}"
    m = re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key)
    if m:
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block.") :]
    m = re.match(r"add_embedding\.linear_([12])\.(.+)", key)  # SDXL-class ControlNets: the size/crop embedding
    if m:
        return f"label_emb.0.{0 if m.group(1) == '1' else 2}.{m.group(2)}"
    return unet_key(key, config)  # the encoder copy: the U-Net's own names


def controlnet_rules(keys: Iterable[str], config, prefix: str = CONTROL) -> list[Rule]:
    """Every ControlNet tensor's place in an original-layout file (``prefix`` "" for files that store the
    ControlNet alone without ``control_model.``)."""
    return [Rule(prefix + controlnet_key(k, config), (("controlnet", k),)) for k in keys]


# -- VAE -------------------------------------------------------------------------------------------

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, config) -> str:
    """diffusers AutoencoderKL key -> original key (without ``first_stage_model.``)."""
    levels = len(config["block_out_channels"])
    key = key.replace("conv_shortcut", "nin_shortcut")
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise LayoutError(key)
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.') :]}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if m:
        direction, level, kind, j, tail = m.groups()
        level = int(level) if direction == "down" else levels - 1 - int(level)  # decoder.up runs backwards
        if kind == "resnets":
            return f"{side}.{direction}.{level}.block.{j}.{tail}"
        return f"{side}.{direction}.{level}.{kind[:-2]}.{tail}"  # downsamplers.0.conv -> downsample.conv
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", rest)
    if m:
        return f"{side}.mid.attn_1.{_VAE_ATTN[m.group(1)]}.{m.group(2)}"
    raise LayoutError(key)


# -- text encoders ---------------------------------------------------------------------------------

_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip


def text_rules(keys: Iterable[str], openclip: bool, part: str = "text_encoder", prefix: str = TEXT) -> list[Rule]:
    """Rules for a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (keys with or
    without ``text_model.``) stored under ``prefix`` (SD: ``cond_stage_model.``; SDXL: see
    :func:`text_prefixes`) as OpenAI CLIP (transformers' own names) or OpenCLIP."""
    if prefix == TEXT:  # SD 1.x / 2.x: the family decides the level below cond_stage_model.
        prefix = CLIP_PREFIX if not openclip else OPENCLIP_PREFIX
    rules, fused = [], {}
    for key in keys:
        short = key.removeprefix("text_model.")
        if not openclip:
            if short == "text_projection.weight":
                raise LayoutError(key)  # (SDXL's projected encoder is OpenCLIP)
            rules.append(Rule(prefix + short, ((part, key),)))
            continue
        if short == "embeddings.token_embedding.weight":
            rules.append(Rule(prefix + "token_embedding.weight", ((part, key),)))
        elif short == "embeddings.position_embedding.weight":
            rules.append(Rule(prefix + "positional_embedding", ((part, key),)))
        elif short.startswith("final_layer_norm."):
            rules.append(Rule(prefix + "ln_final." + short.split(".", 1)[1], ((part, key),)))
        elif short == "text_projection.weight":
            rules.append(Rule(prefix + "text_projection", ((part, key),), transpose=True))
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", short):
            fused.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = key
        elif m := re.match(
            r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2|self_attn\.out_proj)\.(.+)", short
        ):
            old = f"transformer.resblocks.{m.group(1)}.{_OPENCLIP[m.group(2)]}.{m.group(3)}"
            rules.append(Rule(prefix + old, ((part, key),)))
        else:
            raise LayoutError(key)
    for (layer, kind), parts in sorted(fused.items()):
        if set(parts) != {"q", "k", "v"}:
            raise LayoutError(f"encoder.layers.{layer}.self_attn: q, k and v projections must all be present")
        targets = tuple((part, parts[c]) for c in "qkv")
        rules.append(Rule(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}", targets))
    return rules


def is_openclip(text_config) -> bool:
    """SD 2.x's OpenCLIP text tower uses exact GELU; OpenAI's CLIP (SD 1.x) uses quick GELU."""
    return getattr(text_config, "hidden_act", "quick_gelu") == "gelu"


def build_rules(unet_keys, unet_config, vae_keys, vae_config, texts) -> list[Rule]:
    """Every model tensor's place in the original layout. ``texts``: (part, keys, openclip, prefix)
    for each text encoder."""
    rules = [Rule(UNET + unet_key(k, unet_config), (("unet", k),)) for k in unet_keys]
    rules += [Rule(VAE + vae_key(k, vae_config), (("vae", k),)) for k in vae_keys]
    for part, keys, openclip, prefix in texts:
        rules += text_rules(keys, openclip, part, prefix)
    return rules


# -- moving tensors --------------------------------------------------------------------------------


def fit(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``tensor`` in ``shape`` if they differ at most by trailing 1s (1x1 conv <-> linear), else None."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if _strip_ones(tensor.shape) == _strip_ones(shape) and tensor.ndim >= 2 and len(shape) >= 2:
        return tensor.reshape(shape)
    return None


def _strip_ones(shape) -> tuple:
    shape = list(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def to_original(rules: list[Rule], states: dict[str, dict[str, torch.Tensor]], shapes: dict[str, tuple]) -> dict:
    """Model state dicts (``{"unet": ..., "vae": ..., "text_encoder": ...}``) -> original-layout dict.

    ``shapes`` gives the file-side shape where it differs from the model's (VAE attention: 1x1 convs).
    """
    out = {}
    for rule in rules:
        tensors = [states[part][key] for part, key in rule.targets]
        value = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        if rule.transpose:
            value = value.T.contiguous()
        shape = shapes.get(rule.file_key)
        out[rule.file_key] = value if shape is None else value.reshape(shape)
    return out


def file_shapes(rules: list[Rule], model_shapes: dict[tuple[str, str], tuple]) -> dict[str, tuple]:
    """The shapes the original layout stores where they are not the model's: VAE attention
    projections are 1x1 convolutions, (C, C, 1, 1), where diffusers has linear layers (C, C)."""
    shapes = {}
    for rule in rules:
        if len(rule.targets) == 1 and re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", rule.file_key):
            shape = model_shapes[rule.targets[0]]
            if len(shape) == 2:
                shapes[rule.file_key] = (*shape, 1, 1)
    return shapes
