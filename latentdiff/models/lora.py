"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A LoRA file holds, for some linear / convolution layers W (out, in[, k, k]), a pair
``down`` A (r, in[, k, k]) and ``up`` B (out, r[, 1, 1]) and optionally ``alpha``; the adapted
layer computes W x + scale * (alpha / r) * B (A x). Two layouts are read:

- kohya / web-UI: ``lora_unet_<path>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` and
  ``lora_te_<path>...`` for the text encoder, where ``<path>`` is the module path with ``_`` for
  ``.`` (diffusers' names, or the original layout's ``input_blocks_4_1_...``); SDXL files name the
  two encoders ``lora_te1_`` and ``lora_te2_``;
- peft / diffusers: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.`` for the
  text encoder, ``text_encoder_2.`` for SDXL's second; without a prefix, what
  ``peft.get_peft_model_state_dict`` returns), alpha from
  the ``lora_adapter_metadata`` entry where diffusers wrote one, else alpha = r;
- the older diffusers layouts, before peft: attention processors
  (``<attention>.processor.to_q_lora.down.weight``, ``to_out_lora`` for ``to_out.0``; in the text
  encoder ``q_proj`` ... ``out_proj``), ``<path>.lora_linear_layer.down.weight`` and
  ``<path>.lora.down.weight``, alpha = r.

Text-encoder paths are accepted with and without CLIPTextModel's ``text_model.`` level: files
written under transformers 4.x have it (most LoRAs on the hub), transformers 5 dropped it.
:func:`save_lora` writes the kohya layout, or with ``layout="peft"`` the diffusers one that
diffusers' ``load_lora_weights`` reads.

Adapters are applied with forward hooks, so the weights (and the weight hash) stay untouched
until :meth:`LoraSet.fuse` adds the deltas in place; :meth:`LoraSet.unload` restores the exact
original weights. Several adapters can be active at once, each with its own scale.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..checks import check_float
from ..errors import InvalidInputError
from . import ldm_layout as L
from .hashing import file_sha256
from .safe_load import read_tensor_file, write_tensor_file

_KOHYA = re.compile(r"^(lora_unet_|lora_te_|lora_te\d_)(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(.+?)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")
# diffusers before peft: attention processors (to_q_lora ...) and LoRA-compatible layers
_OLD_PROCESSOR = re.compile(r"^(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_LAYER = re.compile(r"^(.+?)\.(?:lora_linear_layer|lora)\.(down|up)\.weight$")
# the processor's projection -> the module: (U-Net, CLIP text encoder)
_OLD_NAMES = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
              "to_out": ("to_out.0", "out_proj")}  # fmt: skip
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "conv_norm_out")
_TE_ROOTS = ("text_model.", "encoder.layers.", "embeddings.", "final_layer_norm")


@dataclass
class _Pair:
    """One layer's low-rank factors as read from a file, before matching."""

    part: str  # "unet" | "text_encoder" | "text_encoder_2" | "" (unknown)
    name: str  # kohya name or module path, as written in the file
    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    keys: list[str] = field(default_factory=list)


_LABELS = {"unet": "U-Net", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}
# kohya's prefixes: SD 1.x / 2.x name the one encoder lora_te_; SDXL lora_te1_ and lora_te2_
_KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


@dataclass
class LoraReport:
    """What loading a LoRA did: returned by ``load_lora`` and printed."""

    name: str
    path: str
    sha256: str
    scale: float
    applied_keys: int
    unmatched_keys: list[str]
    layers: dict[str, int]  # part -> layers adapted

    def summary(self) -> str:
        parts = ", ".join(f"{_LABELS.get(p, p)} {n}" for p, n in self.layers.items() if n)
        text = (f"LoRA {self.name!r}: {self.applied_keys} keys applied to {sum(self.layers.values())} layers "
                f"({parts}), scale {self.scale:g}; {len(self.unmatched_keys)} keys matched nothing")  # fmt: skip
        if self.unmatched_keys:
            text += " (e.g. " + ", ".join(self.unmatched_keys[:3]) + ")"
        return text


@dataclass
class _Adapter:
    report: LoraReport
    layers: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (down, up, alpha / r)
    fused: bool = False
    # (module, device, dtype) -> (down, up) there: copied once, not at every call
    placed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class LoraSet:
    """The adapters loaded into one pipeline's U-Net and text encoder."""

    def __init__(self):
        self.adapters: dict[str, _Adapter] = {}
        self._hooks: dict[torch.nn.Module, Any] = {}
        self._originals: dict[torch.nn.Module, torch.Tensor] = {}  # weights before fusing

    # -- loading ---------------------------------------------------------------------------------

    def load(self, pipe, path: str | Path, scale: float = 1.0, name: Optional[str] = None) -> LoraReport:
        path = Path(path)
        scale = _check_scale(scale)
        name = path.stem if name is None else str(name)
        if name in self.adapters:
            raise InvalidInputError(
                f"a LoRA named {name!r} is already loaded; pass another name= or unload_lora() first"
            )
        nets = {name: module for name, module in pipe.networks() if name != "vae"}
        if any(getattr(m, "fused_projections", False) for net in nets.values() for m in net.modules()):
            # fused attention reads to_qkv, so hooks on to_q / to_k / to_v would silently do nothing
            raise InvalidInputError(
                "this pipeline's attention projections are fused (optimize() / --fast); load LoRAs before optimizing"
            )
        tensors, metadata = read_tensor_file(path)
        pairs, unreadable = _read_pairs(tensors, metadata, path)
        modules = {name: _targets(net, name, sdxl=pipe.sdxl) for name, net in nets.items()}
        layers: dict[torch.nn.Module, tuple] = {}
        counts = {name: 0 for name in nets}
        unmatched = list(unreadable)
        applied = 0
        for pair in pairs:
            found = _match(pair, modules)
            if found is None or pair.down is None or pair.up is None or not _fits(found[1], pair.down, pair.up):
                unmatched += pair.keys
                continue
            part, module = found
            rank = pair.down.shape[0]
            factor = (rank if pair.alpha is None else pair.alpha) / rank
            layers[module] = (pair.down.float(), pair.up.float(), factor)
            counts[part] += 1
            applied += len(pair.keys)
        report = LoraReport(name, str(path), file_sha256(path), scale, applied, sorted(unmatched), counts)
        if not layers:
            example = f"{len(tensors)} keys, e.g. {next(iter(tensors), '-')}"
            if not pairs:
                raise InvalidInputError(
                    f"LoRA {path} is in no layout latentdiff reads ({example}): not a LoRA file, or another kind "
                    "of adapter (LyCORIS LoHa / LoKr, a full checkpoint); LoRAs in the kohya, peft / diffusers "
                    "and older diffusers layouts are read"
                )
            raise InvalidInputError(
                f"LoRA {path} matched nothing in this model ({example}): it was made for another architecture "
                "(SDXL, another base model)"
            )
        self.adapters[name] = _Adapter(report, layers)
        for module in layers:
            self._hook(module)
        print(f"latentdiff: {report.summary()}", file=sys.stderr)
        return report

    def set_scale(self, name: str, scale: float) -> None:
        adapter = self._get(name)
        if adapter.fused:
            raise InvalidInputError(
                f"LoRA {name!r} is fused into the weights; unload_lora() and load it again to rescale"
            )
        adapter.report.scale = _check_scale(scale)

    def _get(self, name: str) -> _Adapter:
        if name not in self.adapters:
            raise InvalidInputError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        return self.adapters[name]

    # -- applying --------------------------------------------------------------------------------

    def _hook(self, module: torch.nn.Module) -> None:
        if module not in self._hooks:
            self._hooks[module] = module.register_forward_hook(self._forward)

    def _forward(self, module, args, output):
        x = args[0]
        for adapter in self.adapters.values():
            entry = adapter.layers.get(module)
            if adapter.fused or entry is None or adapter.report.scale == 0:
                continue
            down, up, factor = entry
            where = (module, x.device, x.dtype)
            if where not in adapter.placed:
                adapter.placed[where] = (down.to(x.device, x.dtype), up.to(x.device, x.dtype))
            down, up = adapter.placed[where]
            if isinstance(module, torch.nn.Conv2d):
                # A (r, in, k, k) with the layer's own stride / padding, then B (out, r, 1, 1)
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                delta = F.conv2d(h, up)
            else:
                delta = F.linear(F.linear(x, down.flatten(1)), up.flatten(1))
            output = output + (adapter.report.scale * factor) * delta
        return output

    def fuse(self) -> None:
        """Add every active adapter's delta to its layers' weights, in place."""
        for adapter in self.adapters.values():
            if adapter.fused:
                continue
            for module, (down, up, factor) in adapter.layers.items():
                w = module.weight
                if module not in self._originals:
                    self._originals[module] = w.detach().clone()
                # B A as a (out, in * k * k) matrix, reshaped to W's shape: exact for 1x1 ups
                delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (adapter.report.scale * factor)
                with torch.no_grad():
                    w.add_(delta.to(w.device, w.dtype))
            adapter.fused = True

    def unload(self, name: Optional[str] = None) -> None:
        """Remove one adapter (not fused) or all of them, restoring fused weights exactly."""
        if name is not None:
            if self._get(name).fused:
                raise InvalidInputError(
                    f"LoRA {name!r} is fused into the weights; unload_lora() without a name removes all"
                )
            del self.adapters[name]
        else:
            for module, original in self._originals.items():
                with torch.no_grad():
                    module.weight.copy_(original.to(module.weight.device, module.weight.dtype))
            self._originals.clear()
            self.adapters.clear()
        used = {m for a in self.adapters.values() if not a.fused for m in a.layers}
        for module in list(self._hooks):
            if module not in used:
                self._hooks.pop(module).remove()

    def records(self) -> list[dict[str, Any]]:
        """What a recipe needs to know: name, file, file hash, scale, fused."""
        return [
            {"name": n, "path": a.report.path, "sha256": a.report.sha256, "scale": a.report.scale, "fused": a.fused}
            for n, a in self.adapters.items()
        ]


# -- reading files ---------------------------------------------------------------------------------


def _read_pairs(tensors: dict[str, Any], metadata: dict[str, str], path) -> tuple[list[_Pair], list[str]]:
    """Group a LoRA file's keys by layer; keys of no known form come back as unreadable.

    A non-finite value or an alpha that is not one number is an error naming the key: such a file
    is damaged, and applying it would give NaN images.
    """
    pairs: dict[str, _Pair] = {}
    unreadable = []
    alphas = _peft_alphas(metadata)
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            unreadable.append(key)
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidInputError(f"LoRA {path}: {key} holds NaN or infinite values; the file is damaged, "
                                    "get or train it again")  # fmt: skip
        if m := _KOHYA.match(key):
            prefix, stem, what = m.groups()
            part = _KOHYA_PARTS.get(prefix, "")
            pair = pairs.setdefault(prefix + stem, _Pair(part, prefix + stem))
            if what == "alpha":
                if value.numel() != 1:
                    raise InvalidInputError(f"LoRA {path}: {key} holds {value.numel()} values; alpha is one number "
                                            "per layer, so the file is damaged or not a LoRA")  # fmt: skip
                pair.alpha = float(value.float().reshape(-1)[0])
            else:
                setattr(pair, "down" if what.startswith("lora_down") else "up", value)
        elif (m := _PEFT.match(key)) or (m := _OLD_PROCESSOR.match(key)) or (m := _OLD_LAYER.match(key)):
            module, *rest = m.groups()
            part, module = _part_of(module.removeprefix("base_model.model."))
            if m.re is _OLD_PROCESSOR:
                projection, what = rest
                module = f"{module}.{_OLD_NAMES[projection][part.startswith('text_encoder')]}"
                down = what == "down"
            else:
                down = rest[-1] in ("lora_A", "down")
            pair = pairs.setdefault(f"{part}:{module}", _Pair(part, module, alpha=alphas.get(part)))
            setattr(pair, "down" if down else "up", value)
        else:
            unreadable.append(key)
            continue
        pair.keys.append(key)
    return list(pairs.values()), unreadable


def _part_of(path: str) -> tuple[str, str]:
    """("unet" | "text_encoder" | "text_encoder_2" | "", module path) from a diffusers-style key's module path."""
    for prefix, part in (("unet.", "unet"), ("text_encoder.", "text_encoder"), ("text_encoder_2.", "text_encoder_2")):
        if path.startswith(prefix):
            return part, path[len(prefix) :]
    if path.startswith(_UNET_ROOTS):
        return "unet", path
    return ("text_encoder" if path.startswith(_TE_ROOTS) else ""), path


def _peft_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """lora_alpha per part from diffusers' ``lora_adapter_metadata`` (absent: alpha = r)."""
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return {}
    out = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        value = meta.get(f"{part}.lora_alpha", meta.get("lora_alpha") if part == "unet" else None)
        if isinstance(value, (int, float)):
            out[part] = float(value)
    return out


def _targets(model: torch.nn.Module, part: str, sdxl: bool = False) -> dict[str, torch.nn.Module]:
    """Every name a LoRA may use for the model's linear / conv layers (``part``: the network's
    attribute name; ``sdxl``: the model is SDXL, whose kohya names number the encoders)."""
    kohya = {"text_encoder": ["lora_te1_"] if sdxl else ["lora_te_"], "text_encoder_2": ["lora_te2_"]}.get(part, [])
    names: dict[str, torch.nn.Module] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        short = path.removeprefix("text_model.")
        names[path] = names[short] = module
        if part != "unet":  # with and without CLIPTextModel's text_model level (transformers 4 / 5)
            names["text_model." + short] = module
        if part == "unet":
            names["lora_unet_" + path.replace(".", "_")] = module
            try:  # the original layout's names, used by some web-UI trainers
                old = L.unet_key(path + ".weight", model.config).removesuffix(".weight")
                names["lora_unet_" + old.replace(".", "_")] = module
            except L.LayoutError:
                pass
        else:
            # kohya spells text_model's layers with that level; the second SDXL encoder's projection sits beside it
            outside = hasattr(model, "text_model") and not path.startswith("text_model.")
            for prefix in kohya:
                inside = path if outside else "text_model." + short
                names[prefix + inside.replace(".", "_")] = module
    return names


def _match(pair: _Pair, modules: dict[str, dict[str, torch.nn.Module]]) -> Optional[tuple[str, torch.nn.Module]]:
    if pair.part not in modules:
        return None
    module = modules[pair.part].get(pair.name)
    return None if module is None else (pair.part, module)


def _fits(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether A (r, in, ...) and B (out, r, ...) fit the layer's weight (out, in, ...)."""
    w = module.weight
    if down.shape[0] != up.shape[1] or up.shape[0] != w.shape[0] or down.shape[1] != w.shape[1]:
        return False
    if isinstance(module, torch.nn.Conv2d):
        return down.ndim == 4 and tuple(down.shape[2:]) == tuple(w.shape[2:]) and tuple(up.shape[2:]) == (1, 1)
    return all(s == 1 for s in down.shape[2:]) and all(s == 1 for s in up.shape[2:])


# -- training adapters (peft) ---------------------------------------------------------------------


def add_lora_adapter(module: torch.nn.Module, *, rank: int, alpha: float, targets, dropout: float = 0.0) -> torch.nn.Module:
    """Add a trainable peft LoRA adapter to ``module`` (a U-Net or text encoder) in place.

    Calls ``peft.inject_adapter_in_model``, not diffusers' / transformers' ``add_adapter``:
    those wrappers gate on their own peft floor (transformers 5.24 refuses every peft below
    0.22, newer than the index served), while the injection they wrap works with any peft
    >= ``compat.PEFT_FOR_LORA``. Only the adapter's parameters are left trainable; B starts at
    zero and A Gaussian, so the adapted module starts equal to the base.
    """
    from ..compat import PEFT_FOR_LORA, DependencyError, require, versions

    require("peft", PEFT_FOR_LORA, "LoRA training")
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        init_lora_weights="gaussian")  # fmt: skip
    try:
        inject_adapter_in_model(config, module)
    except ValueError as e:
        if "target modules" in str(e).lower():
            raise InvalidInputError(f"LoRA targets {list(targets)} match no layer of the {type(module).__name__}: {e}") from e
        stack = ", ".join(f"{k} {v}" for k, v in versions(("peft", "transformers", "diffusers")).items())
        raise DependencyError(f"peft could not add a LoRA adapter with {stack}: {e}") from e
    return module


# -- writing (the trainer's output) ----------------------------------------------------------------


LORA_LAYOUTS = ("kohya", "peft")


def save_lora(path, *, unet_state=None, text_encoder_state=None, rank: int, alpha: float,
              metadata: dict[str, str] | None = None, layout: str = "kohya", text_encoder_2_state=None,
              sdxl: bool = False) -> Path:  # fmt: skip
    """Write a LoRA .safetensors atomically, in the kohya layout or (``layout="peft"``) diffusers'.

    ``unet_state`` / ``text_encoder_state``: what ``peft.get_peft_model_state_dict(model)`` returns
    for a diffusers ``UNet2DConditionModel`` / transformers ``CLIPTextModel`` with an adapter added by
    :func:`add_lora_adapter` (``rank``, ``alpha``): keys such as
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` and
    ``text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`` (``text_model.`` may be absent).

    - ``kohya``: ``lora_unet_*`` / ``lora_te_*`` ``.lora_down.weight`` / ``.lora_up.weight`` /
      ``.alpha`` and kohya's ``ss_*`` metadata: what the web UIs, ComfyUI and kohya's scripts read.
    - ``peft``: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and
      ``text_encoder.text_model.<module>...`` (the spelling most hub LoRAs use, which diffusers reads
      with transformers 4 and 5), with rank, alpha and target modules in ``lora_adapter_metadata``,
      as diffusers' ``save_lora_weights`` writes them: what ``pipe.load_lora_weights`` reads.

    SDXL (``sdxl``, ``text_encoder_2_state`` for its second encoder): kohya's ``lora_te1_`` /
    ``lora_te2_``, or peft's ``text_encoder_2.`` prefix.

    Both are read by :meth:`LatentDiffusion.load_lora`; ``metadata`` is added to the file's own.
    """
    if not unet_state and not text_encoder_state and not text_encoder_2_state:
        raise InvalidInputError("save_lora needs unet_state and/or text_encoder_state (peft state dicts)")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidInputError(f"rank must be a whole number >= 1, got {rank!r}")
    if layout not in LORA_LAYOUTS:
        raise InvalidInputError(f"layout must be one of {', '.join(LORA_LAYOUTS)}, got {layout!r}")
    alpha = check_float(alpha, "alpha", 0.0, None, "kohya's default is alpha = rank")
    target = _safetensors(path)
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise InvalidInputError("save_lora metadata must map strings to strings")
    out: dict[str, torch.Tensor] = {}
    targets: dict[str, dict[str, int]] = {}  # part -> {module: rank}
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    for state, part in ((unet_state, "unet"), (text_encoder_state, "text_encoder"), (text_encoder_2_state, "text_encoder_2")):
        for key, value in (state or {}).items():
            m = _PEFT.match(key)
            if m is None:
                raise InvalidInputError(f"save_lora: {key!r} is not a peft LoRA key (…lora_A.weight / …lora_B.weight)")
            module = m.group(1).removeprefix("base_model.model.").removeprefix(f"{part}.")
            if part != "unet" and module != "text_projection":  # both layouts name CLIPTextModel's text_model level
                module = "text_model." + module.removeprefix("text_model.")
            weight = value.detach().float()
            if layout == "kohya":
                stem = kohya_prefix[part] + module.replace(".", "_")
                out[f"{stem}.{'lora_down' if m.group(2) == 'lora_A' else 'lora_up'}.weight"] = weight
                out[f"{stem}.alpha"] = torch.tensor(alpha)
            else:
                out[f"{part}.{module}.{m.group(2)}.weight"] = weight
                if m.group(2) == "lora_A":  # peft matches a target by its end: without text_model. it fits both
                    targets.setdefault(part, {})[module.removeprefix("text_model.")] = weight.shape[0]
    if layout == "kohya":
        info = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}",
            "ss_network_args": json.dumps({}),
            "ss_training_comment": "written by latentdiff",
            **extra,
        }
    else:
        adapter = {}
        for part, ranks in targets.items():  # the ranks as the tensors have them (`rank` is kohya's metadata)
            r = max(set(ranks.values()), key=list(ranks.values()).count)
            adapter.update({f"{part}.r": r, f"{part}.lora_alpha": alpha, f"{part}.target_modules": sorted(ranks),
                            f"{part}.rank_pattern": {k: v for k, v in ranks.items() if v != r}})  # fmt: skip
        info = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, sort_keys=True), **extra}
    return write_tensor_file(target, out, info)


# Scales used in practice lie within about +-2; far beyond, a LoRA's delta swamps the weights and
# the arithmetic overflows (-1e308 gave NaN images).
MAX_SCALE = 100.0


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise InvalidInputError(
            f"LoRA scale must be a finite number from -{MAX_SCALE:g} to {MAX_SCALE:g} (1.0 = the LoRA's full effect, "
            f"0 = none), got {scale!r}"
        )
    return float(scale)


def _safetensors(path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidInputError(f"{path}: LoRA files are written as .safetensors; give a name ending in .safetensors")
    return path


def parse_lora_spec(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's ``--lora``) -> (path, scale); a Windows drive letter is not a scale."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0
