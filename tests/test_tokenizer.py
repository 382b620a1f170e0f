"""The shipped CLIP tokenizer: the real 49,408-token BPE vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from latentdiff.models.tokenizer import VOCAB_SIZE, asset_dir, derive_vocab, load_clip_tokenizer

# Token ids of OpenAI's CLIP tokenizer, as published with CLIP and used by every SD 1.x model.
KNOWN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "": [49406, 49407],
}


def test_vocabulary_size_and_specials():
    tok = load_clip_tokenizer()
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.pad_token == "<|endoftext|>" and tok.model_max_length == 77
    assert load_clip_tokenizer(pad_token="!").pad_token_id == 0  # SD 2.x padding


@pytest.mark.parametrize("text", list(KNOWN))
def test_known_encodings(text):
    assert load_clip_tokenizer()(text).input_ids == KNOWN[text]


def test_lowercases_and_splits_punctuation():
    tok = load_clip_tokenizer()
    assert tok("A Photo Of A Cat").input_ids == KNOWN["a photo of a cat"]
    assert tok("a photo of a cat.").input_ids[:-1] == KNOWN["a photo of a cat"][:-1] + [tok.convert_tokens_to_ids(".</w>")]


def test_padding_to_context_length():
    ids = load_clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


def _bpe_gz() -> Path | None:
    """CLIP's original merge list, if present (.ci/run fetches it from the open-clip-torch wheel)."""
    env = os.environ.get("LATENTDIFF_CLIP_BPE")
    if env:
        return Path(env)
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def test_shipped_files_are_derived_from_clip_bpe(tmp_path):
    gz = _bpe_gz()
    if gz is None:
        pytest.skip("CLIP's bpe_simple_vocab_16e6.txt.gz is not available (set LATENTDIFF_CLIP_BPE)")
    from latentdiff.models.tokenizer import write_vocab_files

    write_vocab_files(gz, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (asset_dir() / name).read_bytes(), name


def test_derive_rejects_other_files(tmp_path):
    import gzip

    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="not CLIP's BPE merge list"):
        derive_vocab(bad)
