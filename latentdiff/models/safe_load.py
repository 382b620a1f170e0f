"""Reading and writing tensor files without running anyone's code.

``.safetensors`` is a JSON header plus raw bytes: reading it cannot execute anything, so it is the
preferred format. ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` files are Python pickles, which can
name any function to call while loading; they are opened only with
``torch.load(weights_only=True)``, whose restricted unpickler accepts tensors, numbers, strings
and containers and refuses everything else before calling it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError, MissingFileError
from ..fileio import atomic_write

SAFETENSORS = (".safetensors",)
PICKLES = (".ckpt", ".pt", ".pth", ".bin")


def read_tensor_file(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``(contents, metadata)`` of a tensor file, on the CPU.

    For safetensors, ``contents`` maps names to tensors and ``metadata`` is the header's
    ``__metadata__`` (strings). For a pickle, ``contents`` is the unpickled top-level dict (tensors,
    and whatever plain values sit beside them, e.g. ``state_dict`` and ``global_step``) and
    ``metadata`` is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        return _read_safetensors(path)
    if suffix in PICKLES:
        return _read_pickle(path), {}
    raise InvalidInputError(
        f"{path}: unknown weights format {suffix or '(no extension)'!r}; give a .safetensors file "
        f"(or a {'/'.join(PICKLES)} pickle)"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InvalidInputError(
            f"{path} is not a readable safetensors file ({_first_line(e)}); it is truncated or damaged: "
            "download or export it again"
        ) from None
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The restricted unpickler stops at the first global it does not allow, before calling it.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it names {found.group(1)}" if found else _first_line(e)
        raise InvalidInputError(
            f"refused to load {path}: its pickle asks to run code ({what}). latentdiff loads "
            "pickles only as plain tensors; if you trust the file, convert it to .safetensors elsewhere, "
            "or get a .safetensors release of the model"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, not a torch file, ...
        raise InvalidInputError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it is truncated "
                                "or damaged: download or export it again") from None  # fmt: skip
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    return data


def write_tensor_file(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` atomically: safetensors unless ``path`` ends in a pickle suffix.

    A pickle gets ``{"state_dict": tensors, **metadata}`` (the original checkpoints' shape), which
    ``torch.load(weights_only=True)`` reads back.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if path.suffix.lower() in PICKLES:
        with atomic_write(path) as f:
            torch.save({"state_dict": tensors, **metadata}, f)
        return path
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata or None)
    with atomic_write(path) as f:
        f.write(blob)
    return path


def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
