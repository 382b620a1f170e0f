"""Prompt text -> CLIP conditioning: long prompts, weighting syntax, clip skip.

One pure function, :func:`encode_prompts`, used by generation and batch inference (and by
training validation later). What it does, in the order it does it:

1. :func:`parse_weights` reads the weighting syntax users know from the web UIs: ``(text)`` = x1.1,
   ``[text]`` = /1.1, ``(text:1.3)`` = x1.3, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` are
   literal brackets. Malformed syntax is read literally; it never raises.
2. :func:`tokenize_prompt` turns the runs into CLIP tokens with one weight each, in chunks of at
   most 75 tokens (77 minus BOS and EOS); the word ``BREAK`` starts a new chunk.
3. Each chunk is wrapped as ``BOS tokens EOS pad...`` (77 ids, padded with the tokenizer's own pad
   token: ``<|endoftext|>`` for SD 1.x, ``!`` for SD 2.x) and encoded on its own; the chunks are
   concatenated along the sequence axis: (77 * chunks, D). A prompt of at most 75 tokens is thus
   exactly what diffusers' pipeline encodes.
4. Weighted token embeddings are scaled by their weights and the whole embedding is then rescaled
   so that its mean is what it was (as the web UIs do), per prompt, so that a prompt's
   conditioning never depends on the other prompts of a batch.
5. Prompts with fewer chunks than asked for are padded with empty chunks (the encoding of
   ``BOS EOS pad...``), so that a negative prompt matches its prompt's length.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch

from ..errors import InvalidInputError

ROUND, SQUARE = 1.1, 1 / 1.1
MAX_WEIGHT = 100.0  # |weight| above this is clamped: (x:1e309) or 8000 nested brackets must not give inf
_WEIGHT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split prompt text into runs of (text, weight).

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.3)`` multiplies by 1.3, nesting
    multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters. Anything malformed
    (a bracket without its partner, a weight that is not a number) is read as literal text.
    """
    # 1. find matching bracket pairs with a stack; unmatched brackets stay literal
    chars: list[tuple[str, bool]] = []  # (character, escaped)
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            chars.append((text[i + 1], True))
            i += 2
        else:
            chars.append((text[i], False))
            i += 1
    partner: dict[int, int] = {}
    stack: list[int] = []
    for pos, (ch, escaped) in enumerate(chars):
        if escaped:
            continue
        if ch in "([":
            stack.append(pos)
        elif ch in ")]":
            # close the innermost open bracket of the same kind; a mismatched closer is literal
            if stack and chars[stack[-1]][0] == ("(" if ch == ")" else "["):
                open_pos = stack.pop()
                partner[open_pos], partner[pos] = pos, open_pos
    # 2. weights: a round group ending in ":number" (at its own level) takes that number for 1.1
    multiplier = [1.0] * len(chars)
    hidden = [False] * len(chars)
    for open_pos, close_pos in sorted((o, c) for o, c in partner.items() if o < c):
        factor = ROUND if chars[open_pos][0] == "(" else SQUARE
        if chars[open_pos][0] == "(":
            colon = _last_top_level_colon(chars, partner, open_pos, close_pos)
            if colon is not None:
                tail = "".join(ch for ch, _ in chars[colon:close_pos])
                m = _WEIGHT.fullmatch(tail)
                if m is None:
                    continue  # (x:abc): read literally, brackets and all
                factor = float(m.group(1))
                if not math.isfinite(factor):
                    continue  # (x:1e999): not a usable number, read literally
                for k in range(colon, close_pos):
                    hidden[k] = True
        hidden[open_pos] = hidden[close_pos] = True
        for k in range(open_pos + 1, close_pos):
            multiplier[k] *= factor
    # 3. runs of equal weight
    runs: list[tuple[str, float]] = []
    for (ch, _), weight, gone in zip(chars, multiplier, hidden):
        if gone:
            continue
        weight = max(-MAX_WEIGHT, min(MAX_WEIGHT, weight))
        if runs and runs[-1][1] == weight:
            runs[-1] = (runs[-1][0] + ch, weight)
        else:
            runs.append((ch, weight))
    return runs


def _last_top_level_colon(chars, partner, open_pos: int, close_pos: int):
    """Position of the last unescaped ':' directly inside the group (not in a nested group)."""
    found, k = None, open_pos + 1
    while k < close_pos:
        ch, escaped = chars[k]
        if not escaped and ch in "([" and k in partner:
            k = partner[k] + 1
            continue
        if ch == ":" and not escaped:
            found = k
        k += 1
    return found


CHUNK = 75  # content tokens per chunk: CLIP's 77 positions minus BOS and EOS
_BREAK = re.compile(r"\bBREAK\b")


def tokenize_prompt(tokenizer, text: str) -> list[list[tuple[int, float]]]:
    """``text`` -> chunks of at most 75 (token id, weight) pairs; at least one chunk."""
    chunks: list[list[tuple[int, float]]] = [[]]
    for run, weight in parse_weights(text):
        for k, piece in enumerate(_BREAK.split(run)):
            if k > 0 and chunks[-1]:  # BREAK: close the chunk (a BREAK on an empty chunk does nothing)
                chunks.append([])
            for token in tokenizer(piece, add_special_tokens=False, verbose=False).input_ids:
                if len(chunks[-1]) == CHUNK:
                    chunks.append([])
                chunks[-1].append((token, weight))
    if len(chunks) > 1 and not chunks[-1]:  # a trailing BREAK opens nothing
        chunks.pop()
    return chunks


def count_chunks(tokenizer, text: str) -> int:
    """How many 77-token chunks ``text`` encodes to."""
    return len(tokenize_prompt(tokenizer, text))


def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str],
    *,
    clip_skip: int = 0,
    num_chunks: Optional[int] = None,
    penultimate: bool = False,
    pooled: bool = False,
):
    """Encode ``prompts`` -> (len(prompts), 77 * chunks, D) on the text encoder's device and dtype.

    ``chunks`` is ``num_chunks`` if given (it must be at least every prompt's own count), else the
    largest count among the prompts. ``clip_skip`` = N takes the output of the N-th last layer
    instead of the last one (through the final layer norm), as diffusers' ``clip_skip`` does.

    SDXL (``penultimate``): the hidden states of the layer before the last (no final layer norm),
    and with ``clip_skip`` = N the N-th before that, as diffusers' SDXL pipelines take them. With
    ``pooled`` (a ``CLIPTextModelWithProjection``) the result is a pair: the embeddings and the
    projected pooled embedding (P, D') of each prompt's first chunk, unweighted (as the web UIs
    pool long prompts).
    """
    layers = text_encoder.config.num_hidden_layers - (1 if penultimate else 0)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise InvalidInputError(f"clip_skip must be a whole number from 0 to {layers - 1}, got {clip_skip!r}")
    tokenized = [tokenize_prompt(tokenizer, p) for p in prompts]
    width = max(len(t) for t in tokenized) if num_chunks is None else num_chunks
    if any(len(t) > width for t in tokenized):
        raise InvalidInputError(
            f"a prompt needs {max(len(t) for t in tokenized)} chunks of 75 tokens but only {width} fit "
            "(prompt_embeds fixes the length): shorten it, or pass negative_prompt_embeds"
        )

    # One text-encoder call for every chunk of every prompt, plus one empty chunk if any pads.
    needs_padding = any(len(t) < width for t in tokenized)
    rows = [chunk for t in tokenized for chunk in t] + ([[]] if needs_padding else [])
    ids = torch.tensor([_wrap(tokenizer, [tok for tok, _ in chunk]) for chunk in rows], device=text_encoder.device)
    with torch.no_grad():
        output = text_encoder(ids, output_hidden_states=bool(clip_skip or penultimate))
        if penultimate:
            encoded = output.hidden_states[-(clip_skip + 2)]
        elif clip_skip:
            # transformers 5 keeps the layer norm on the model itself; 4.x on .text_model
            norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
            encoded = norm(output.hidden_states[-(clip_skip + 1)])
        else:
            encoded = output.last_hidden_state  # (chunks, 77, D)
        projected = output.text_embeds if pooled else None  # (chunks, D')
    empty = encoded[-1]  # used only when needs_padding
    out, first, start = [], [], 0
    for t in tokenized:
        own = encoded[start : start + len(t)]  # (k, 77, D)
        first.append(start)
        start += len(t)
        weights = torch.tensor([_wrap_weights(chunk) for chunk in t], dtype=own.dtype, device=own.device)
        if bool((weights != 1).any()):
            own = _weighted(own, weights)
        padding = [empty] * (width - len(t))
        out.append(torch.cat([*own, *padding]))  # (77 * width, D)
    if pooled:
        return torch.stack(out), projected[first]
    return torch.stack(out)


def _weighted(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale token embeddings (k, 77, D) by their weights (k, 77), then restore the mean of the
    whole prompt's embedding. Where that mean is ~0 (a layer norm without bias) the ratio means
    nothing and would blow up, so the scaled embedding is returned as it is."""
    z32 = z.float()
    scaled = z32 * weights.float()[..., None]
    before, after = z32.mean(), scaled.mean()
    if abs(float(after)) > 1e-6 * float(z32.abs().mean()) and bool(torch.isfinite(before / after)):
        scaled = scaled * (before / after)
    return scaled.to(z.dtype)


def _wrap(tokenizer, tokens: list[int]) -> list[int]:
    """BOS tokens EOS pad... : the 77 ids CLIP reads, laid out as the tokenizer itself pads."""
    pad = tokenizer.pad_token_id
    return [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [pad] * (CHUNK - len(tokens))


def _wrap_weights(chunk: list[tuple[int, float]]) -> list[float]:
    return [1.0, *(w for _, w in chunk), 1.0] + [1.0] * (CHUNK - len(chunk))
