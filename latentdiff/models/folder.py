"""Reading and writing diffusers-format model folders (SD 1.x / 2.x and SDXL layouts), offline.

A folder holds ``model_index.json`` and one subfolder per part; an SDXL folder also
``text_encoder_2/`` and ``tokenizer_2/``, and an SDXL refiner folder has only those (its
``model_index.json`` names no ``text_encoder`` / ``tokenizer``). Each part is loaded by its own
library class with ``local_files_only=True``; before that, every file the part needs is checked
to exist, and a part that fails to load is reported by the file that broke it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import InvalidInputError, MissingFileError
from ..fileio import atomic_dir, atomic_write, recover_dir
from ..generation.samplers import scheduler_from_config

# part -> (config file, accepted weight files: any one of them)
_DIFFUSERS_WEIGHTS = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",  # sharded
    "diffusion_pytorch_model.bin",
]
_TRANSFORMERS_WEIGHTS = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
_WEIGHTS = {
    "unet": ("config.json", _DIFFUSERS_WEIGHTS),
    "vae": ("config.json", _DIFFUSERS_WEIGHTS),
    "text_encoder": ("config.json", _TRANSFORMERS_WEIGHTS),
    "text_encoder_2": ("config.json", _TRANSFORMERS_WEIGHTS),
}
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_SCHEDULER_FILE = "scheduler_config.json"
_FIX = "re-export the model (save_pretrained) or copy the folder again"


def _variant_name(filename: str, variant: Optional[str]) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (and the same for ``*.index.json``)."""
    if not variant:
        return filename
    stem, ext = filename.split(".", 1)
    return f"{stem}.{variant}.{ext}"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"model folder is missing {path}; {_FIX}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{path} is not valid JSON ({e}); {_FIX}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} should hold a JSON object; {_FIX}")
    return data


def check_folder(path: str | Path, variant: Optional[str] = None) -> Path:
    """Check that ``path`` is a complete model folder; return it as a Path."""
    root = Path(path)
    if not root.exists():
        recover_dir(root)  # a save that was killed between its renames: finish it
    if not root.exists():
        raise MissingFileError(
            f"model folder {root} does not exist; give a diffusers-format folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or use --preset"
        )
    if not root.is_dir():
        raise InvalidInputError(f"{root} is a file, not a model folder; give the folder that holds model_index.json")
    index = _read_json(root / "model_index.json")
    for part in folder_parts(index):
        config, weights = _WEIGHTS[part]
        _read_json(root / part / config)
        names = [_variant_name(w, variant) for w in weights]
        if not any((root / part / w).is_file() for w in names):
            raise MissingFileError(f"model folder is missing {root / part / names[0]}; {_FIX}")
        # A fast-tokenizer file alone will do; otherwise the BPE vocabulary and merges (older saves).
        tokenizer = _TOKENIZER_OF.get(part)
        if tokenizer and not (root / tokenizer / "tokenizer.json").is_file():
            for name in _TOKENIZER_FILES:
                if not (root / tokenizer / name).is_file():
                    raise MissingFileError(f"model folder is missing {root / tokenizer / name}; {_FIX}")
    _read_json(root / "scheduler" / _SCHEDULER_FILE)
    return root


def folder_parts(index: dict) -> list[str]:
    """The networks a folder's ``model_index.json`` names: U-Net, VAE and the text encoders it has
    (an SDXL folder: both; a refiner's: ``text_encoder_2`` alone; an entry ``[null, null]`` is none)."""
    def named(part: str) -> bool:
        entry = index.get(part)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    parts = ["unet", "vae"]
    if named("text_encoder") or not named("text_encoder_2"):  # (SD folders always have the first)
        parts.append("text_encoder")
    if named("text_encoder_2"):
        parts.append("text_encoder_2")
    return parts


def read_size_rules(path: str | Path) -> Optional[tuple[int, int]]:
    """(pixels per latent cell, native side) of a model folder from its configs alone, without loading
    weights (None if they cannot be read): lets a command check sizes before a long load."""
    from .architectures import size_rules

    root = Path(path)
    try:
        vae = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
        unet = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
        return size_rules(vae, unet)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _weights_file(root: Path, part: str, variant: Optional[str]) -> Path:
    for w in _WEIGHTS[part][1]:
        candidate = root / part / _variant_name(w, variant)
        if candidate.is_file():
            return candidate
    raise AssertionError("check_folder guarantees a weights file")  # pragma: no cover


def load_folder(path: str | Path, dtype: Optional[torch.dtype] = None, variant: Optional[str] = None) -> dict[str, Any]:
    """Load every part of a model folder; no network is used.

    ``dtype`` None means float32 for all three networks, whatever the files hold: left alone,
    diffusers upcasts half-precision files while transformers keeps them, and the parts disagree.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype = torch.float32 if dtype is None else dtype
    root = check_folder(path, variant)
    index = _read_json(root / "model_index.json")
    common = {"local_files_only": True, "variant": variant}
    loaders = {
        "unet": lambda p: UNet2DConditionModel.from_pretrained(p, torch_dtype=dtype, **common),
        "vae": lambda p: AutoencoderKL.from_pretrained(p, torch_dtype=dtype, **common),
        "text_encoder": lambda p: CLIPTextModel.from_pretrained(p, dtype=dtype, **common),
        "text_encoder_2": lambda p: CLIPTextModelWithProjection.from_pretrained(p, dtype=dtype, **common),
    }
    parts: dict[str, Any] = {"text_encoder": None, "tokenizer": None}
    for part in folder_parts(index):
        try:
            parts[part] = loaders[part](root / part).eval().requires_grad_(False)
        except Exception as e:  # the libraries raise many types for a damaged file
            bad = _weights_file(root, part, variant)
            raise InvalidInputError(
                f"could not load {bad} (or its config.json): {_first_line(e)}; the file is corrupt, "
                f"truncated or does not match the config; {_FIX}"
            ) from e
        tokenizer = _TOKENIZER_OF.get(part)
        if tokenizer:
            try:
                parts[tokenizer] = CLIPTokenizer.from_pretrained(root / tokenizer, local_files_only=True)
            except Exception as e:
                raise InvalidInputError(f"could not load the tokenizer in {root / tokenizer}: {_first_line(e)}; {_FIX}") from e
    if isinstance(index.get("force_zeros_for_empty_prompt"), bool):
        parts["force_zeros_for_empty_prompt"] = index["force_zeros_for_empty_prompt"]
    scheduler_file = root / "scheduler" / _SCHEDULER_FILE
    parts["scheduler_config"] = _read_json(scheduler_file)
    try:
        scheduler_from_config(parts["scheduler_config"])  # fail now, naming the file, not at the first call
    except Exception as e:
        raise InvalidInputError(f"{scheduler_file} does not describe a usable scheduler: {_first_line(e)}; {_FIX}") from e
    return parts


def save_folder(path: str | Path, *, unet, vae, text_encoder, tokenizer, scheduler_config: dict,
                text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt: bool = True) -> Path:  # fmt: skip
    """Write a folder that both ``load_folder`` and diffusers load: ``StableDiffusionPipeline``, or for
    SDXL ``StableDiffusionXLPipeline`` (a refiner folder: ``StableDiffusionXLImg2ImgPipeline``).

    The folder appears complete or not at all (written beside it, then renamed into place).
    """
    target = Path(path)
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not (target / "model_index.json").is_file()):
        raise InvalidInputError(
            f"{target} exists and is not a model folder; save_pretrained replaces only an earlier model "
            "folder, so give a new or empty folder"
        )
    scheduler = scheduler_from_config(scheduler_config)
    if text_encoder_2 is None:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    else:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        from .architectures import time_id_count

        refiner = time_id_count(unet, text_encoder_2.config.projection_dim) == 5
        common = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "text_encoder_2": text_encoder_2,
                  "tokenizer_2": tokenizer_2, "unet": unet, "scheduler": scheduler,
                  "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt}  # fmt: skip
        pipe = (StableDiffusionXLImg2ImgPipeline(**common, requires_aesthetics_score=True) if refiner
                else StableDiffusionXLPipeline(**common))  # fmt: skip
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # Recent transformers write only tokenizer.json; older readers need vocab.json + merges.txt.
        for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None and not (tmp / name / "vocab.json").exists():
                backend.model.save(str(tmp / name))
        # Keep the scheduler config exactly as the model had it: writing the in-memory
        # scheduler's config would turn its defaults into explicit keys.
        with atomic_write(tmp / "scheduler" / _SCHEDULER_FILE, "w") as f:
            json.dump(scheduler_config, f, indent=2, sort_keys=True)
        for name in ("text_encoder", "text_encoder_2"):
            if (tmp / name / "config.json").is_file():
                _load_as_float32(tmp / name / "config.json")
    return Path(path)


def _load_as_float32(config_file: Path) -> None:
    """Make the text encoder load in float32 by default, whatever dtype its weights are stored in.

    transformers 5 loads a model in the dtype its config.json records (``dtype``; ``torch_dtype``
    before), while diffusers loads the U-Net and VAE in float32 unless told otherwise. A folder
    saved in float16 (small on disk) thus loaded, with diffusers' default arguments, as a float16
    text encoder feeding a float32 U-Net: "Half and Float" on the first call. Recording float32
    keeps the half-precision files and makes every part load alike; ``torch_dtype=`` still chooses.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    with atomic_write(config_file, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
