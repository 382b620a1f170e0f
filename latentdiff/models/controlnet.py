"""ControlNet weights (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"),
read offline and written back.

:func:`load_controlnet` reads

- a diffusers ``ControlNetModel`` folder (``config.json`` + weights; also a training run's output
  folder, which holds it as ``controlnet/``);
- one file in the original layout: ``control_model.*`` keys (lllyasviel's releases, which may also
  carry the whole base model beside them), or the same names without the prefix (ControlNets
  distributed alone), or diffusers' own names; ``.safetensors``, or a ``.pth`` / ``.ckpt`` pickle
  read with ``weights_only`` (``safe_load``). Every key is accounted for with the rules of
  ``ldm_layout.controlnet_rules``: loaded, known and unused (the base model's weights), or
  reported; a missing, unexpected or misshapen key is an error naming it.

A ControlNet is a trainable copy of its base U-Net's encoder, so a single file is read into a
``ControlNetModel`` configured from the pipeline's own U-Net (diffusers' ``ControlNetModel.from_unet``),
with the conditioning encoder's widths read from the file's shapes. That is also where SDXL
ControlNets plug in: ``from_unet`` carries an SDXL U-Net's addition embeddings, and the key rules
map them (``add_embedding`` <-> ``label_emb``).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from ..errors import InvalidInputError, MissingFileError
from . import ldm_layout as L
from .safe_load import SAFETENSORS, write_tensor_file

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model.bin")  # fmt: skip
# Keys of a full ControlNet release that are the base model it was trained on (the pipeline's own is used).
_BASE_MODEL = re.compile(r"^(model\.diffusion_model\.|first_stage_model\.|cond_stage_model\.|model_ema\.|"
                         r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*"
                         r"|lvlb_weights|logvar)$)")  # fmt: skip


def load_controlnet(path, unet, *, strict: bool = True):
    """A ``ControlNetModel`` (float32, eval, frozen) from a folder or a single file; see the module docstring.

    ``unet`` is the base model's U-Net: a single file takes its architecture, and a folder is checked
    against it, so that a ControlNet made for another base model is an error that says so.
    """
    root = Path(path).expanduser()
    if root.is_dir():
        controlnet = _from_folder(root)
    elif root.is_file():
        controlnet = _from_file(root, unet, strict)
    else:
        raise MissingFileError(f"ControlNet {root} does not exist; give a ControlNetModel folder or a "
                               ".safetensors / .pth file")  # fmt: skip
    check_fits(controlnet, unet, root)
    return controlnet.eval().requires_grad_(False)


def _from_folder(root: Path):
    from diffusers import ControlNetModel

    if not (root / "config.json").is_file() and (root / "controlnet" / "config.json").is_file():
        root = root / "controlnet"  # a training run's output folder
    if not (root / "config.json").is_file():
        raise MissingFileError(f"{root} is not a ControlNet folder: it has no config.json")
    if not any((root / name).is_file() for name in _WEIGHTS):
        raise MissingFileError(f"ControlNet folder {root} has no weights ({_WEIGHTS[0]})")
    try:
        return ControlNetModel.from_pretrained(root, local_files_only=True, torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a damaged folder fails in many ways
        raise InvalidInputError(f"could not load the ControlNet in {root} ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:200]}); it is damaged or not a ControlNet") from None  # fmt: skip


def controlnet_from_unet(unet, *, load_weights: bool, empty: bool = False, **options):
    """diffusers' ``ControlNetModel.from_unet``: the U-Net's encoder copied (``load_weights``, how a new
    ControlNet starts training) or only its configuration (``empty``: on the meta device, to be filled).

    The ControlNet reads the latents alone, so an inpainting U-Net's extra input channels are left out,
    and an IP-Adapter's image projection (``encoder_hid_dim_type``) is not part of it.
    """
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from diffusers.configuration_utils import FrozenDict

    config = dict(unet.config)
    config["in_channels"] = unet.config.out_channels
    if config.get("encoder_hid_dim_type") == "ip_image_proj":
        config["encoder_hid_dim_type"] = None
    if load_weights and config["in_channels"] != unet.config.in_channels:
        raise InvalidInputError("a ControlNet is trained from a standard U-Net; this one is an inpainting U-Net "
                                f"({unet.config.in_channels} input channels)")  # fmt: skip
    source = unet if load_weights else SimpleNamespace(config=FrozenDict(config))
    if empty:
        with init_empty_weights():
            return ControlNetModel.from_unet(source, load_weights_from_unet=False, **options)
    return ControlNetModel.from_unet(source, load_weights_from_unet=load_weights, **options)


def check_fits(controlnet, unet, where) -> None:
    """A ControlNet's residuals must have the U-Net encoder's shapes: same widths, depth and text width."""
    c, u = controlnet.config, unet.config
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types"):
        if _plain(c.get(key)) != _plain(u.get(key)):
            raise InvalidInputError(
                f"the ControlNet {where} was made for another base model ({key} {_plain(c.get(key))}, this model's "
                f"{_plain(u.get(key))}); use a ControlNet made for this model's family (SD 1.x, SD 2.x)"
            )
    if c.in_channels != u.out_channels:
        raise InvalidInputError(f"the ControlNet {where} reads {c.in_channels}-channel latents, this model makes "
                                f"{u.out_channels}-channel ones")  # fmt: skip


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _from_file(path: Path, unet, strict: bool):
    from .single_file import account, read_checkpoint

    tensors, _ = read_checkpoint(path)
    if any(k.startswith(L.CONTROL) for k in tensors):
        prefix, layout = L.CONTROL, "original"
    elif "input_hint_block.0.weight" in tensors:
        prefix, layout = "", "original"
    elif "controlnet_cond_embedding.conv_in.weight" in tensors:
        prefix, layout = "", "diffusers"
    else:
        raise InvalidInputError(f"{path} is not a ControlNet: it has neither control_model.* keys nor a conditioning "
                                "encoder (input_hint_block / controlnet_cond_embedding)")  # fmt: skip
    options = _hint_options(tensors, prefix + ("input_hint_block" if layout == "original" else "controlnet_cond_embedding"))
    model = controlnet_from_unet(unet, load_weights=False, empty=True, **options)
    keys = list(model.state_dict())
    if layout == "original":
        rules = L.controlnet_rules(keys, model.config, prefix)
    else:
        rules = [L.Rule(k, (("controlnet", k),)) for k in keys]
    shapes = {("controlnet", k): tuple(v.shape) for k, v in model.state_dict().items()}
    report, states = account(tensors, rules, shapes, _ignored)
    if not report.clean and strict:
        raise InvalidInputError(
            f"{path} does not fit this model's U-Net as a ControlNet: {'; '.join(report.lines()[1:])}. Is it made for "
            "this model's family (SD 1.x, SD 2.x)? Pass strict=False to load what fits"
        )
    complete = not (report.missing or report.mismatched)
    if not complete:  # what the file lacks keeps its initial values
        model = controlnet_from_unet(unet, load_weights=False, **options)
    model.load_state_dict(states["controlnet"], strict=complete, assign=complete)
    if not report.clean:
        import sys

        print(f"latentdiff: ControlNet {path} loaded with differences:", file=sys.stderr)
        for line in report.lines():
            print(f"  {line}", file=sys.stderr)
    return torch.nn.Module.to(model, dtype=torch.float32)


def _hint_options(tensors, stem: str) -> dict:
    """The conditioning encoder's input channels and widths, from its convolutions' shapes."""
    first = tensors.get(f"{stem}.0.weight" if stem.endswith("input_hint_block") else f"{stem}.conv_in.weight")
    if first is None or first.ndim != 4:
        raise InvalidInputError(f"the ControlNet file has no usable {stem} weights")
    if stem.endswith("input_hint_block"):  # convolutions at 0, 2, ..., 14: widths at 0 and after each strided one
        convs = sorted(int(m.group(1)) for k in tensors if (m := re.match(re.escape(stem) + r"\.(\d+)\.weight$", k)))
        widths = [tensors[f"{stem}.{i}.weight"].shape[0] for i in convs[:-1]]
    else:
        blocks = sorted(int(m.group(1)) for k in tensors if (m := re.match(re.escape(stem) + r"\.blocks\.(\d+)\.weight$", k)))
        widths = [first.shape[0]] + [tensors[f"{stem}.blocks.{i}.weight"].shape[0] for i in blocks]
    out = tuple(widths[::2])  # each level: a convolution at its width, then a strided one into the next
    return {"conditioning_channels": int(first.shape[1]), "conditioning_embedding_out_channels": out}


def _ignored(key: str) -> Optional[str]:
    if _BASE_MODEL.search(key):
        return "the base model's weights stored beside the ControlNet (the pipeline's own are used)"
    return None


def save_single_file(controlnet, path) -> Path:
    """Write ``controlnet`` as one original-layout file (``control_model.*`` keys; safetensors unless the
    name ends in .pth / .ckpt), which web UIs, diffusers' ``ControlNetModel.from_single_file`` and
    :func:`load_controlnet` read."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS + (".pth", ".ckpt", ".pt"):
        raise InvalidInputError(f"{path}: a ControlNet file ends in .safetensors (or .pth)")
    state = controlnet.state_dict()
    rules = L.controlnet_rules(state.keys(), controlnet.config)
    return write_tensor_file(path, L.to_original(rules, {"controlnet": state}, {}))
