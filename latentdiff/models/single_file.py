"""Single-file SD 1.x / 2.x (``ldm``) and SDXL (``sgm``) checkpoints, read and written offline.

Loading (:func:`load_single_file`):

1. the file is read safely (``safe_load``: safetensors, or a pickle through ``weights_only``);
2. the architecture comes from, in this order: the ``variant`` argument; the configuration our
   exporter embeds in the file; detection from keys and shapes among the shipped variants
   (``architectures.VARIANTS``, built from the ``sd15`` / ``sd21`` / ``sdxl`` / ``sdxl-refiner``
   presets: no download, ever);
3. every key is accounted for with the rules of ``ldm_layout``: each is loaded, or known and
   unused (EMA copies, schedule buffers, OpenCLIP's last layer and projection), or reported.
   Missing, unexpected or misshapen keys are an error listing them; ``strict=False`` prints the
   report instead and loads what fits (missing tensors keep their initial values).

Export (:func:`save_single_file`) writes the same layout, plus our configuration in the metadata.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..errors import InvalidInputError
from . import ldm_layout as L
from .architectures import VARIANTS, Architecture, build_components
from .safe_load import PICKLES, SAFETENSORS, read_tensor_file, write_tensor_file
from .tokenizer import VOCAB_SIZE

META_KEY = "latentdiff"  # safetensors metadata / checkpoint entry holding our JSON configuration
SINGLE_FILE_SUFFIXES = SAFETENSORS + PICKLES


# Known keys that no part of the pipeline uses: kept out of the "unexpected" list.
_IGNORED = [
    (re.compile(r"^model_ema\."), "EMA copy of the U-Net (the file's main weights are used)"),
    (re.compile(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*"
                r"|lvlb_weights|logvar)$"), "training noise-schedule buffers (the scheduler config has them)"),
    (re.compile(r"\.position_ids$"), "CLIP position ids (rebuilt by the model)"),
    (re.compile(r"^cond_stage_model\.model\.(logit_scale|text_projection)$"), "OpenCLIP contrastive head (unused)"),
    (re.compile(r"^conditioner\.embedders\.\d\.model\.logit_scale$"), "OpenCLIP contrastive temperature (unused)"),
    (re.compile(r"^(v_pred|ztsnr)$"), "v-prediction / zero-terminal-SNR markers"),
]  # fmt: skip
_RESBLOCK = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


@dataclass
class KeyReport:
    """How every key of a checkpoint was used."""

    loaded: int = 0
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> count
    missing: list[str] = field(default_factory=list)  # needed by the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, used by nothing
    mismatched: list[str] = field(default_factory=list)  # "key: file (a, b) vs model (c, d)"

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"{self.loaded} tensors loaded"]
        out += [f"{n} ignored: {why}" for why, n in self.ignored.items()]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("wrong shape", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
                out.append(f"{len(keys)} {label}: {shown}")
        return out


# -- reading ---------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a single-file checkpoint and its side information (metadata, global_step)."""
    contents, metadata = read_tensor_file(path)
    info: dict[str, Any] = dict(metadata)
    if isinstance(contents.get("state_dict"), dict):  # the original .ckpt: {"state_dict": ..., "global_step": ...}
        info.update({k: v for k, v in contents.items() if k != "state_dict" and isinstance(v, (str, int, float))})
        contents = contents["state_dict"]
    tensors = {k: v for k, v in contents.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InvalidInputError(f"{path} holds no tensors; give a Stable Diffusion checkpoint")
    return tensors, info


def detect_architecture(tensors: dict[str, torch.Tensor], info: dict[str, Any], variant: Optional[str] = None,
                        path: str | Path = "the checkpoint") -> Architecture:  # fmt: skip
    """The architecture of a checkpoint: ``variant`` if given, our embedded config, else detection."""
    if variant is not None:
        if variant not in VARIANTS:
            raise InvalidInputError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
        return replace(VARIANTS[variant], reason="given")
    embedded = info.get(META_KEY)
    if isinstance(embedded, str):
        try:
            cfg = json.loads(embedded)
            extra = {"text_encoder_2": cfg["text_encoder_2"], "tokenizer_2": cfg["tokenizer_2"]} if cfg.get("text_encoder_2") else {}
            return Architecture(name="embedded", unet=cfg["unet"], vae=cfg["vae"], text_encoder=cfg["text_encoder"],
                                scheduler=cfg["scheduler"], tokenizer=cfg.get("tokenizer") or {},
                                added_tokens=tuple(cfg.get("added_tokens", [])), **extra,
                                reason="configuration stored in the file by latentdiff")  # fmt: skip
        except (ValueError, KeyError, TypeError):
            pass  # damaged metadata: fall back to detection
    variant, reason = _detect(tensors, info, path)
    return replace(variant, reason=reason)


def _detect(tensors: dict[str, torch.Tensor], info: dict[str, Any], path) -> tuple[Architecture, str]:
    """Pick a shipped variant from keys and shapes.

    SD 1.x and 2.x differ in their text encoder (``cond_stage_model.transformer`` = OpenAI CLIP,
    768 wide; ``cond_stage_model.model`` = OpenCLIP, 1024 wide), which the U-Net's cross-attention
    width confirms. SD 2.x epsilon (512 base) and v-prediction (768) files have identical shapes;
    they are told apart by a ``v_pred`` key (written by several trainers), else by a statistic of
    the released weights that ComfyUI uses: the last output block's first transformer norm has
    biases spread with std > 0.09 in the v models (about 0.03 in the base ones). That is a
    heuristic, so it is said aloud; pass ``variant=`` to override it.
    """
    probe = L.UNET + "input_blocks.0.0.weight"
    if probe in tensors and any(k.startswith(L.SDXL_TEXT) for k in tensors):
        # SDXL's sgm layout: the base has CLIP ViT-L as embedder 0 and OpenCLIP bigG as 1; the refiner
        # only OpenCLIP bigG, as embedder 0
        if any(k.startswith(L.SDXL_TEXT + "1.model.") for k in tensors):
            return VARIANTS["sdxl"], "SDXL text encoders (CLIP ViT-L and OpenCLIP bigG)"
        if any(k.startswith(L.SDXL_TEXT + "0.model.") for k in tensors):
            return VARIANTS["sdxl-refiner"], "SDXL refiner text encoder (OpenCLIP bigG alone)"
    if probe not in tensors:
        if any(k.startswith(("down_blocks.", "unet.", "lora_")) for k in tensors):
            raise InvalidInputError(f"{path} is not a full checkpoint in the original layout (it looks like a "
                                    "diffusers part or a LoRA); give a model file, or load LoRAs with --lora")  # fmt: skip
        raise InvalidInputError(f"{path} is not an SD 1.x / 2.x checkpoint: it has no {probe}")
    attn2 = [v for k, v in tensors.items() if k.startswith(L.UNET) and k.endswith("attn2.to_k.weight")]
    width = attn2[0].shape[1] if attn2 else None
    if any(k.startswith(L.TEXT + "model.") for k in tensors) or width == 1024:
        if info.get("v_pred") is not None or "v_pred" in tensors:
            return VARIANTS["sd2-v"], "SD 2.x text encoder and a v_pred marker"
        norm = tensors.get(L.UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if norm is not None and norm.device.type != "meta" and float(norm.float().std(unbiased=False)) > 0.09:
            return VARIANTS["sd2-v"], "SD 2.x text encoder; weight statistics suggest v-prediction (heuristic)"
        return VARIANTS["sd2"], "SD 2.x text encoder; weight statistics suggest epsilon prediction (heuristic)"
    if any(k.startswith(L.TEXT + "transformer.") for k in tensors) or width == 768:
        return VARIANTS["sd1"], "SD 1.x text encoder (CLIP ViT-L)"
    raise InvalidInputError(f"{path}: cannot tell SD 1.x from 2.x or SDXL (no text encoder, no cross-attention); "
                            f"pass variant= one of {', '.join(VARIANTS)}")  # fmt: skip


# -- building and accounting -----------------------------------------------------------------------


def model_rules(parts: dict[str, Any]) -> list[L.Rule]:
    """The rules of a model's networks (``{"unet": ..., "vae": ..., "text_encoder": ..., "text_encoder_2": ...}``,
    absent text encoders None)."""
    from .architectures import is_sdxl, time_id_count

    unet, vae = parts["unet"], parts["vae"]
    sdxl = is_sdxl(unet)
    refiner = sdxl and time_id_count(unet, parts["text_encoder_2"].config.projection_dim) == 5
    texts = [(part, parts[part].state_dict().keys(), L.is_openclip(parts[part].config), prefix)
             for part, prefix in L.text_prefixes(sdxl, refiner).items()]  # fmt: skip
    return L.build_rules(unet.state_dict().keys(), unet.config, vae.state_dict().keys(), vae.config, texts)


def networks(parts: dict[str, Any]) -> dict[str, Any]:
    """The networks among ``parts`` (those that are not None), by name."""
    return {name: parts[name] for name in ("unet", "vae", "text_encoder", "text_encoder_2") if parts.get(name) is not None}


def account(tensors: dict[str, torch.Tensor], rules: list[L.Rule], model_shapes: dict[tuple[str, str], tuple],
            ignored: Union[int, Callable[[str], Optional[str]]]) -> tuple[KeyReport, dict[str, dict[str, torch.Tensor]]]:  # fmt: skip
    """Match the file's keys to the model's tensors: (report, state dicts per part of what fits).

    A file key no rule uses is counted under ``ignored(key)`` (the reason it is known and unused), or
    reported as unexpected when that is None. An int is a full model's first text encoder's layer
    count (the model files' own rule for what is known and unused).
    """
    if isinstance(ignored, int):
        text_layers = ignored
        ignored = lambda key: _ignored(key, text_layers)  # noqa: E731
    report = KeyReport()
    states: dict[str, dict[str, torch.Tensor]] = {part: {} for part, _ in model_shapes}
    used = set()
    aliases = _clip_aliases(tensors)
    for rule in rules:
        key = rule.file_key if rule.file_key in tensors else aliases.get(rule.file_key)
        if key is None:
            report.missing.append(rule.file_key)
            continue
        used.add(key)
        value = tensors[key].T if rule.transpose and tensors[key].ndim == 2 else tensors[key]
        pieces = [value] if len(rule.targets) == 1 else _split(value, len(rule.targets))
        shapes = [model_shapes[t] for t in rule.targets]
        fitted = [None if p is None else L.fit(p, s) for p, s in zip(pieces or [None] * len(shapes), shapes)]
        if any(f is None for f in fitted):
            want = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])
            report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want)}")
            continue
        for (part, target), tensor in zip(rule.targets, fitted):
            states[part][target] = tensor
        report.loaded += 1
    for key in tensors:
        if key in used:
            continue
        why = ignored(key)
        if why is None:
            report.unexpected.append(key)
        else:
            report.ignored[why] = report.ignored.get(why, 0) + 1
    return report, states


def _clip_aliases(tensors) -> dict[str, str]:
    """Older SD 1.x files store the CLIP text model without the ``text_model.`` level."""
    old = L.TEXT + "transformer."
    return {L.CLIP_PREFIX + k[len(old) :]: k for k in tensors if k.startswith(old) and not k.startswith(L.CLIP_PREFIX)}


def _split(value: torch.Tensor, n: int):
    # clones: views of one storage could not be saved as separate tensors later
    return None if value.shape[0] % n else [c.clone() for c in value.chunk(n, dim=0)]


def _ignored(key: str, text_layers: int) -> Optional[str]:
    for pattern, why in _IGNORED:
        if pattern.search(key):
            return why
    m = _RESBLOCK.match(key)
    if m and int(m.group(1)) >= text_layers:
        # SD 2.x conditions on OpenCLIP's penultimate layer, so diffusers keeps 23 of its 24 layers
        return "OpenCLIP layers after the one SD 2.x conditions on"
    return None


def load_single_file(path: str | Path, variant: Optional[str] = None, strict: bool = True,
                     dtype: Optional[torch.dtype] = None) -> tuple[dict[str, Any], Architecture, KeyReport]:  # fmt: skip
    """Load a single-file checkpoint: (parts for ``LatentDiffusion(**parts)``, architecture, report)."""
    tensors, info = read_checkpoint(path)
    arch = detect_architecture(tensors, info, variant, path)
    built = build_components(arch, empty=True)
    parts = networks(built)
    try:
        rules = model_rules(built)
    except L.LayoutError as e:
        raise InvalidInputError(f"the architecture of {path} has no original-layout form ({e})") from None
    shapes = {(part, k): tuple(v.shape) for part, m in parts.items() for k, v in m.state_dict().items()}
    first = parts.get("text_encoder", parts.get("text_encoder_2"))
    text_layers = first.config.num_hidden_layers
    report, states = account(tensors, rules, shapes, lambda key: _ignored(key, text_layers))
    if "heuristic" in arch.reason:
        print(f"latentdiff: {path}: read as {arch.description} ({arch.reason}); "
              f"pass variant= / --variant if that is wrong", file=sys.stderr)  # fmt: skip
    if not report.clean:
        summary = "; ".join(report.lines()[1:])
        if strict:
            raise InvalidInputError(
                f"{path} does not match {arch.name} ({arch.reason}): {summary}. Pass variant= (--variant) if the "
                "architecture was guessed wrong, or strict=False to load what fits"
            )
    complete = not (report.missing or report.mismatched)  # every model tensor has a value from the file
    if not complete:  # the others need initial values
        built = build_components(arch)
        parts = networks(built)
    for name, module in parts.items():
        module.load_state_dict(states[name], strict=complete, assign=complete)
        torch.nn.Module.to(module, dtype=dtype or torch.float32).eval().requires_grad_(False)  # (diffusers .to() warns)
    if not report.clean:
        print(f"latentdiff: {path} loaded with differences ({arch.name}, {arch.reason}):", file=sys.stderr)
        for line in report.lines():
            print(f"  {line}", file=sys.stderr)
    tokenizers = {name: built[name] for name in ("tokenizer", "tokenizer_2")}
    return {"text_encoder": None, **parts, **tokenizers, "scheduler_config": dict(arch.scheduler)}, arch, report


# -- writing ---------------------------------------------------------------------------------------


def original_state_dict(parts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The networks' tensors (``parts`` as in :func:`model_rules`) under their original-layout names."""
    rules = model_rules(parts)
    states = {name: module.state_dict() for name, module in networks(parts).items()}
    model_shapes = {(p, k): tuple(v.shape) for p, s in states.items() for k, v in s.items()}
    return L.to_original(rules, states, L.file_shapes(rules, model_shapes))


_NOT_STORED = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "architectures",
               "dtype", "torch_dtype", "transformers_version", "model_type")  # fmt: skip


def _text_config(encoder, tokenizer) -> Optional[dict[str, Any]]:
    """What a single file records of a text encoder's config (the rest comes from its tokenizer)."""
    if encoder is None:
        return None
    config = {k: v for k, v in encoder.config.to_dict().items() if not k.startswith("_") and k not in _NOT_STORED}
    if encoder.config.max_position_embeddings != tokenizer.model_max_length:
        config["max_position_embeddings"] = encoder.config.max_position_embeddings
    return config


def save_single_file(pipe, path: str | Path) -> Path:
    """Write ``pipe`` as one original-layout file (safetensors unless the name ends in .ckpt/.pt)."""
    path = Path(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise InvalidInputError(f"{path}: a single-file checkpoint ends in .safetensors (or .ckpt); "
                                "give such a name, or a folder name for the diffusers layout")  # fmt: skip
    parts = dict(pipe.networks())
    try:
        tensors = original_state_dict(parts)
    except L.LayoutError as e:
        raise InvalidInputError(
            f"this model's architecture has no original-layout form ({e}); save a folder instead"
        ) from None
    tok = pipe.tokenizer or pipe.tokenizer_2
    config = {
        "format": 1,
        "unet": _plain(pipe.unet.config),
        "vae": _plain(pipe.vae.config),
        "text_encoder": _text_config(pipe.text_encoder, pipe.tokenizer),
        "scheduler": pipe.scheduler_config,
        "tokenizer": None if pipe.tokenizer is None else {"pad_token": tok.pad_token, "model_max_length": tok.model_max_length},
        "added_tokens": tok.convert_ids_to_tokens(list(range(VOCAB_SIZE, len(tok)))),
    }  # fmt: skip
    if pipe.text_encoder_2 is not None:
        tok2 = pipe.tokenizer_2
        config["text_encoder_2"] = _text_config(pipe.text_encoder_2, tok2)
        config["tokenizer_2"] = {"pad_token": tok2.pad_token, "model_max_length": tok2.model_max_length}
    metadata = {META_KEY: json.dumps(config, sort_keys=True)}
    if pipe.scheduler_config.get("prediction_type") == "v_prediction":
        # Markers in the state dict, where ComfyUI looks (for SDXL-class files: "v_pred", and "ztsnr" for a
        # zero-terminal-SNR schedule) and latentdiff reads them for any file. For SD 2.x files ComfyUI and
        # A1111 look at no marker (a weight statistic, a test run of the U-Net): the README says what to set.
        metadata["v_pred"] = "1"
        tensors["v_pred"] = torch.tensor([])
        if pipe.scheduler_config.get("rescale_betas_zero_snr"):
            tensors["ztsnr"] = torch.tensor([])
    return write_tensor_file(path, tensors, metadata)


def _plain(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
