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


_TRUST = ("latentdiff loads pickles only as plain tensors; if you trust the file, convert it to .safetensors "
          "elsewhere, or get a .safetensors release of the model")  # fmt: skip


def load_pickle(path: Path, *, allow: tuple = (), mmap: bool = False, fix: str = "download or export it again",
                code_fix: str = _TRUST, label: str = "") -> Any:  # fmt: skip
    """A pickle read with ``torch.load(weights_only=True)``: tensors, numbers, strings, containers and
    the globals in ``allow``, nothing that can run code. ``mmap`` leaves the tensor bytes on disk
    (a check of a large file reads its structure only). A pickle that names anything else, or a
    file that is not a readable torch pickle, is an ``InvalidInputError`` naming the file (as
    ``label``, default its path); ``fix`` / ``code_fix`` say what to do about a damaged / a code-running one."""
    label = label or str(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip file
    except pickle.UnpicklingError as e:
        # The restricted unpickler stops at the first global it does not allow, before calling it.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it names {found.group(1)}" if found else _first_line(e)
        raise InvalidInputError(f"refused to load {label}: its pickle asks to run code ({what}); {code_fix}") from None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file fails in many ways (KeyError for a text file)
        raise InvalidInputError(f"{label} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); "
                                f"it is truncated or damaged: {fix}") from None  # fmt: skip
    return data


def _read_pickle(path: Path) -> dict[str, Any]:
    data = load_pickle(path)
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
