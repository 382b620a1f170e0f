"""Textual inversion embeddings (Gal et al. 2022, "An Image is Worth One Word").

An embedding is one or more learned vectors for the text encoder's token-embedding table. Loading
one adds a token to the tokenizer and a row to the table per vector; an embedding of n > 1
vectors gets tokens ``T``, ``T_1``, ..., ``T_{n-1}`` and a prompt's ``T`` is expanded to all of
them before tokenization (diffusers names them the same way), so weighting such as ``(T:1.2)`` and
the 75-token chunking of ``generation/prompts.py`` see ordinary tokens. Layouts read:

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "name": ...}``; A1111 ``.safetensors``:
  ``{"emb_params": (n, D)}`` (the token defaults to the file name, as in the web UI);
- diffusers ``learned_embeds``: ``{"<token>": (D,) or (n, D)}`` (the token defaults to the key).
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


def read_embedding(path: str | Path, token: Optional[str] = None) -> tuple[str, torch.Tensor]:
    """(token, vectors (n, D)) from a textual-inversion file."""
    path = Path(path)
    contents, _ = read_tensor_file(path)
    if "clip_l" in contents or "clip_g" in contents:
        raise InvalidInputError(f"{path} is an SDXL embedding (clip_l / clip_g); latentdiff runs SD 1.x / 2.x models")
    if isinstance(contents.get("string_to_param"), dict) and contents["string_to_param"]:
        vectors, default = next(iter(contents["string_to_param"].values())), path.stem
    elif "emb_params" in contents:
        vectors, default = contents["emb_params"], path.stem
    else:
        tensors = {k: v for k, v in contents.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise InvalidInputError(
                f"{path} is not a textual-inversion embedding (expected string_to_param, emb_params or one "
                f"token -> vector entry; found {', '.join(list(contents)[:5]) or 'nothing'})"
            )
        default, vectors = next(iter(tensors.items()))
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or vectors.numel() == 0:
        raise InvalidInputError(f"{path}: the embedding is not a vector or a (vectors, dim) matrix")
    token = default if token is None else token
    if not isinstance(token, str) or not token.strip() or re.search(r"\s", token):
        raise InvalidInputError(f"embedding token must be one word without spaces, got {token!r}; pass token=")
    return token, vectors.reshape(-1, vectors.shape[-1]).detach()


def add_embedding(tokenizer, text_encoder, path: str | Path, token: Optional[str] = None) -> Embedding:
    """Add the file's vectors to ``tokenizer`` and ``text_encoder`` (in place)."""
    token, vectors = read_embedding(path, token)
    table = text_encoder.get_input_embeddings()
    if vectors.shape[1] != table.weight.shape[1]:
        raise InvalidInputError(
            f"{path} holds {vectors.shape[1]}-wide vectors but this text encoder's are {table.weight.shape[1]}-wide: "
            "the embedding was trained for another model (SD 1.x: 768, SD 2.x: 1024)"
        )
    tokens = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab or t.lower() in vocab]
    if taken:
        raise InvalidInputError(f"token {taken[0]!r} is already in the tokenizer; pass another token= for {path}")
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
    return Embedding(token, tokens, str(path), file_sha256(path))


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
