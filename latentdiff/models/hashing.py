"""Hashes that identify weights and files: in image recipes, batch runs, caches and LoRA records.

Each is the first 16 hex digits of a SHA-256, enough to tell models and files apart, short enough
to read in a recipe.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch


def weight_hash(modules: Iterable[tuple[str, torch.nn.Module]], skip: Optional[Callable[[str], bool]] = None) -> str:
    """SHA-256 (first 16 hex digits) over every tensor's name, dtype, shape and bytes.

    Equal weights in equal dtypes give equal hashes wherever they live (CPU or GPU). Tensors whose
    ``prefix.name`` ``skip`` accepts are left out (an IP-Adapter's layers inside the U-Net).
    """
    h = hashlib.sha256()
    for prefix, module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            if skip is not None and skip(f"{prefix}.{name}"):
                continue
            t = tensor.detach().cpu().contiguous().reshape(-1)  # reshape: 0-dim tensors cannot be viewed as bytes
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(modules: Iterable[torch.nn.Module]) -> tuple:
    """Cheap key that changes whenever a weight is replaced, moved, cast or changed in place.

    ``_version`` is PyTorch's in-place-modification counter (shared with views), so an optimizer
    step or a fused LoRA invalidates a cached ``weight_hash`` without hashing anything.
    """
    return tuple(
        (id(t), t.data_ptr(), t._version, t.dtype)
        for m in modules
        for t in (*m.parameters(), *m.buffers())
    )


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits, like the weight hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
