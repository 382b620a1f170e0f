"""Helpers that several test modules share (test modules never import each other)."""

from __future__ import annotations

from latentdiff.models.architectures import build_components


def build_nets(architecture, empty: bool = False):
    """(unet, vae, text_encoder, tokenizer) of an architecture record, from the library's one builder."""
    parts = build_components(architecture, empty=empty)
    return parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]
