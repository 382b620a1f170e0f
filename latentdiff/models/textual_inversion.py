"""Textual inversion embeddings (Gal et al. 2022, "An Image is Worth One Word").

An embedding is one or more learned vectors for the text encoder's token-embedding table. Loading
one adds a token to the tokenizer and a row to the table per vector; an embedding of n > 1
vectors gets tokens ``T``, ``T_1``, ..., ``T_{n-1}`` and a prompt's ``T`` is expanded to all of
them before tokenization (diffusers names them the same way), so weighting such as ``(T:1.2)`` and
the 75-token chunking of ``generation/prompts.py`` see ordinary tokens. Layouts read:

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "name": ...}``; A1111 ``.safetensors``:
  ``{"emb_params": (n, D)}`` (the token defaults to the file name, as in the web UI);
- diffusers ``learned_embeds``: ``{"<token>": (D,) or (n, D)}`` (the token defaults to the key);
- SDXL (A1111, ComfyUI, kohya): ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, one set of vectors
  per text encoder, the same token added to both tokenizers (the token defaults to the file name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import InvalidInputError
from .hashing import file_sha256
from .safe_load import read_tensor_file


@dataclass
class Embedding:
    token: str
    tokens: list[str]  # what the token expands to in a prompt
    path: str
    sha256: str

    def record(self) -> dict:
        return {"token": self.token, "vectors": len(self.tokens), "path": self.path, "sha256": self.sha256}


SDXL_KEYS = ("clip_l", "clip_g")  # the vectors for text_encoder and text_encoder_2


def read_embedding(path: str | Path, token: Optional[str] = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(token, vectors): ``{"": (n, D)}`` for an SD 1.x / 2.x embedding, ``{"clip_l": (n, 768),
    "clip_g": (n, 1280)}`` (either may be absent) for an SDXL one."""
    path = Path(path)
    contents, _ = read_tensor_file(path)
    if any(key in contents for key in SDXL_KEYS):
        found = {key: contents[key] for key in SDXL_KEYS if key in contents}
        default = path.stem
    elif isinstance(contents.get("string_to_param"), dict) and contents["string_to_param"]:
        found, default = {"": next(iter(contents["string_to_param"].values()))}, path.stem
    elif "emb_params" in contents:
        found, default = {"": contents["emb_params"]}, path.stem
    else:
        tensors = {k: v for k, v in contents.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise InvalidInputError(
                f"{path} is not a textual-inversion embedding (expected string_to_param, emb_params, clip_l / clip_g "
                f"or one token -> vector entry; found {', '.join(list(contents)[:5]) or 'nothing'})"
            )
        default, vectors = next(iter(tensors.items()))
        found = {"": vectors}
    for vectors in found.values():
        if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or vectors.numel() == 0:
            raise InvalidInputError(f"{path}: the embedding is not a vector or a (vectors, dim) matrix")
    token = default if token is None else token
    if not isinstance(token, str) or not token.strip() or re.search(r"\s", token):
        raise InvalidInputError(f"embedding token must be one word without spaces, got {token!r}; pass token=")
    counts = {v.reshape(-1, v.shape[-1]).shape[0] for v in found.values()}
    if len(counts) > 1:
        raise InvalidInputError(f"{path}: clip_l and clip_g hold different numbers of vectors; the file is damaged")
    return token, {key: v.reshape(-1, v.shape[-1]).detach() for key, v in found.items()}


def add_embedding(encoders: list[tuple[str, object, object]], path: str | Path, token: Optional[str] = None) -> Embedding:
    """Add the file's vectors to the text encoders (in place). ``encoders``: (key, tokenizer, text
    encoder) of each encoder the model has: ``[("", tok, enc)]`` for SD 1.x / 2.x, ``("clip_l", ...)``
    and ``("clip_g", ...)`` for SDXL (the refiner: ``clip_g`` alone)."""
    token, found = read_embedding(path, token)
    keys = [key for key, _, _ in encoders]
    if "" in found and "" not in keys:
        raise InvalidInputError(f"{path} is an SD 1.x / 2.x embedding (one set of vectors); this SDXL model needs "
                                "clip_l / clip_g vectors, one set per text encoder")  # fmt: skip
    if "" not in found and "" in keys:
        raise InvalidInputError(f"{path} is an SDXL embedding (clip_l / clip_g); this model is SD 1.x / 2.x")
    missing = [key for key in keys if key not in found]
    if missing:
        raise InvalidInputError(f"{path} has no {missing[0]} vectors, which this model's text encoder needs")
    n = next(iter(found.values())).shape[0]
    tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
    for key, tokenizer, text_encoder in encoders:  # check all before changing any
        table = text_encoder.get_input_embeddings()
        if found[key].shape[1] != table.weight.shape[1]:
            raise InvalidInputError(
                f"{path} holds {found[key].shape[1]}-wide {key + ' ' if key else ''}vectors but this text encoder's are "
                f"{table.weight.shape[1]}-wide: the embedding was trained for another model (SD 1.x: 768, SD 2.x: 1024, "
                "SDXL: clip_l 768 and clip_g 1280)"
            )
        vocab = tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab or t.lower() in vocab]
        if taken:
            raise InvalidInputError(f"token {taken[0]!r} is already in the tokenizer; pass another token= for {path}")
    for key, tokenizer, text_encoder in encoders:
        _append(tokenizer, text_encoder, tokens, found[key], path)
    return Embedding(token, tokens, str(path), file_sha256(path))


def _append(tokenizer, text_encoder, tokens: list[str], vectors: torch.Tensor, path) -> None:
    table = text_encoder.get_input_embeddings()
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(table.weight.shape[0], table.weight.shape[0] + len(tokens))):
        raise InvalidInputError(f"the tokenizer and text encoder disagree on the vocabulary size; cannot add {path}")
    # A new table with the rows appended (no random initialisation, so no RNG is consumed).
    weight = torch.cat([table.weight.detach(), vectors.to(table.weight.device, table.weight.dtype)])
    text_encoder.set_input_embeddings(
        torch.nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight).requires_grad_(False)
    )
    text_encoder.config.vocab_size = weight.shape[0]


def expand(prompt: str, embeddings: list[Embedding]) -> str:
    """Replace each multi-vector token by its tokens (``T`` -> ``T T_1 T_2``).

    The tokenizer matches added tokens case-insensitively inside any text, so the replacement is
    case-insensitive too and skips occurrences already followed by ``_<digit>``.
    """
    for emb in embeddings:
        if len(emb.tokens) > 1:
            pattern = re.compile(re.escape(emb.token) + r"(?!_\d)", re.IGNORECASE)
            prompt = pattern.sub(" ".join(emb.tokens), prompt)
    return prompt
