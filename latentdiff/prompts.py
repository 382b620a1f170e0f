"""Prompt text -> CLIP conditioning.

One pure function used by generation (and later by batch inference and training validation).
Prompts are tokenized to the text encoder's context length (77 for CLIP), padded with the
tokenizer's own pad token (``<|endoftext|>`` for SD 1.x, ``!`` for SD 2.x), and encoded by the
CLIP text transformer; the last hidden state is the conditioning.
"""

from __future__ import annotations

import warnings

import torch


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Encode ``prompts`` -> (len(prompts), 77, D) on the text encoder's device and dtype.

    Tokens past the context length are cut off with a warning that says how many.
    """
    max_len = tokenizer.model_max_length
    # verbose=False: we say it ourselves, in words that fit (transformers warns of "indexing errors")
    longest = max(len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids)
    if longest > max_len:
        warnings.warn(
            f"a prompt is {longest - 2} tokens long; the text encoder sees only the first {max_len - 2}",
            stacklevel=2,
        )
    tokens = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    ids = tokens.input_ids.to(text_encoder.device)
    # SD checkpoints were trained without an attention mask; a few text encoders ask for one.
    mask = tokens.attention_mask.to(ids.device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return text_encoder(ids, attention_mask=mask)[0]
