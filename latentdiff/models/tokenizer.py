"""The CLIP BPE tokenizer that ships with latentdiff.

OpenAI's CLIP vocabulary is distributed as one gzipped list of BPE merges
(``bpe_simple_vocab_16e6.txt.gz``, found for example in the ``open-clip-torch`` wheel).
``transformers.CLIPTokenizer`` instead reads a ``vocab.json`` (token -> id) and a
``merges.txt``. :func:`derive_vocab` turns the first into the second; the derived files live
in ``latentdiff/assets/clip_tokenizer`` so that no run ever needs the network or open_clip.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from ..fileio import atomic_write

# CLIP keeps the first 49152 - 256 - 2 merges of the list (the rest were never trained);
# 256 byte symbols + 256 end-of-word byte symbols + 48894 merges + 2 specials = 49408 ids.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
ASSET_DIR = "assets/clip_tokenizer"


def derive_vocab(bpe_gz: str | Path) -> tuple[dict[str, int], list[str]]:
    """Read CLIP's gzipped merge list and return ``(vocab, merges)`` in CLIPTokenizer's form."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} is not CLIP's BPE merge list (expected {NUM_MERGES} pairs after the header)")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # GPT-2-style byte-level BPE: 256 printable stand-ins for the raw bytes, in id order
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived {len(vocab)} distinct tokens from {bpe_gz}, expected {VOCAB_SIZE}")
    return vocab, merges


def write_vocab_files(bpe_gz: str | Path, out_dir: str | Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` derived from ``bpe_gz`` into ``out_dir``."""
    vocab, merges = derive_vocab(bpe_gz)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "vocab.json", "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with atomic_write(out / "merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def asset_dir() -> Path:
    """Folder of the shipped tokenizer files (inside the installed package)."""
    return Path(str(resources.files("latentdiff") / ASSET_DIR))


def load_clip_tokenizer(pad_token: str = EOS, model_max_length: int = 77):
    """The real CLIP tokenizer from the shipped files, never from a hub.

    SD 1.x pads with ``<|endoftext|>``; SD 2.x (OpenCLIP) pads with ``"!"`` (id 0).
    """
    from transformers import CLIPTokenizer

    d = asset_dir()
    return CLIPTokenizer(
        vocab=str(d / "vocab.json"),
        merges=str(d / "merges.txt"),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


if __name__ == "__main__":  # python -m latentdiff.models.tokenizer BPE_GZ OUT_DIR
    import sys

    write_vocab_files(sys.argv[1], sys.argv[2])
