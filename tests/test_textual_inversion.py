"""Textual inversion: A1111 and diffusers layouts, multi-vector tokens, use in weighted / long prompts.

The reference is diffusers' own ``load_textual_inversion`` on a StableDiffusionPipeline with the
same weights (a private one: the shared ``reference`` fixture must not change).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentdiff import InvalidInputError
from latentdiff.generation.prompts import count_chunks
from latentdiff.generation.recipe import read_recipe

D = 32  # the tiny text encoder's width


def _vectors(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture
def files(tmp_path):
    """One embedding in each layout: diffusers (1 vector), A1111 .pt (3 vectors), A1111 safetensors (2)."""
    diffusers_file = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": _vectors(1, 1)[0]}, str(diffusers_file))
    a1111_pt = tmp_path / "mystyle.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vectors(3, 2)}, "name": "mystyle", "step": 100},
               a1111_pt)  # fmt: skip
    a1111_st = tmp_path / "badhands.safetensors"
    save_file({"emb_params": _vectors(2, 3)}, str(a1111_st))
    return diffusers_file, a1111_pt, a1111_st


@pytest.fixture
def theirs(_reference_pipe, tiny_dir):
    pipe = copy.deepcopy(_reference_pipe)
    from diffusers import PNDMScheduler

    pipe.scheduler = PNDMScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    return pipe


def test_embeddings_match_diffusers(tiny, theirs, files, no_network):
    ours = copy.deepcopy(tiny)
    diffusers_file, a1111_pt, a1111_st = files
    assert ours.load_textual_inversion(diffusers_file).tokens == ["<cat-toy>"]
    assert ours.load_textual_inversion(a1111_pt).tokens == ["mystyle", "mystyle_1", "mystyle_2"]
    assert ours.load_textual_inversion(a1111_st, token="bad-hands").tokens == ["bad-hands", "bad-hands_1"]
    theirs.load_textual_inversion(str(diffusers_file))
    theirs.load_textual_inversion(str(a1111_pt), token="mystyle")
    theirs.load_textual_inversion(str(a1111_st), token="bad-hands")
    prompt, negative = "a <cat-toy> in mystyle on a table", "bad-hands"
    mine = ours(prompt, negative_prompt=negative, seed=2, num_inference_steps=2, height=32, width=32,
                output_type="np").images  # fmt: skip
    ref = theirs(prompt, negative_prompt=negative, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=[torch.Generator("cpu").manual_seed(2)]).images  # fmt: skip
    np.testing.assert_allclose(mine, ref, atol=1e-4)
    from latentdiff.generation.prompts import encode_prompts

    plain = encode_prompts(ours.tokenizer, ours.text_encoder, ["a cat in a style on a table"])
    assert not torch.allclose(
        encode_prompts(ours.tokenizer, ours.text_encoder, [prompt]), plain
    )  # tokens did something


def test_tokens_work_with_weighting_and_chunking(tiny, files):
    from latentdiff.generation.prompts import encode_prompts
    from latentdiff.models.textual_inversion import expand

    ours = copy.deepcopy(tiny)
    _, a1111_pt, _ = files
    emb = ours.load_textual_inversion(a1111_pt)
    tok, enc = ours.tokenizer, ours.text_encoder
    text = expand("a photo in mystyle", [emb])
    assert text == "a photo in mystyle mystyle_1 mystyle_2"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[-3:] == tok.convert_tokens_to_ids(emb.tokens)
    # the learned vectors are the embedding rows of the new ids
    rows = enc.get_input_embeddings().weight[ids[-3:]]
    torch.testing.assert_close(rows, _vectors(3, 2))
    # weighting applies to the expanded tokens, and they count toward the 75-token chunks
    assert expand("(mystyle:1.3)", [emb]) == "(mystyle mystyle_1 mystyle_2:1.3)"
    weighted = encode_prompts(tok, enc, [expand("a photo in (mystyle:1.3)", [emb])])
    unweighted = encode_prompts(tok, enc, [text])
    assert not torch.allclose(weighted, unweighted)
    assert (
        count_chunks(tok, expand("mystyle " * 25, [emb])) == 1
        and count_chunks(tok, expand("mystyle " * 26, [emb])) == 2
    )
    result = ours("(mystyle:1.3) " * 26, seed=1, num_inference_steps=1, height=32, width=32, output_type="latent")
    assert result.params[0]["embeddings"][0]["token"] == "mystyle"


def test_recipe_records_embeddings(tiny, files, tmp_path):
    ours = copy.deepcopy(tiny)
    ours.load_textual_inversion(files[0])
    path = ours("a <cat-toy>", seed=1, num_inference_steps=1, height=32, width=32).save(tmp_path / "x.png")[0]
    (entry,) = read_recipe(path)["embeddings"]
    assert entry["token"] == "<cat-toy>" and entry["vectors"] == 1 and len(entry["sha256"]) == 16


def test_bad_embeddings_say_why(tiny, files, tmp_path):
    ours = copy.deepcopy(tiny)
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(wide))
    with pytest.raises(InvalidInputError, match="768-wide vectors.*another model"):
        ours.load_textual_inversion(wide)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(sdxl))
    with pytest.raises(InvalidInputError, match="SDXL"):
        ours.load_textual_inversion(sdxl)
    ours.load_textual_inversion(files[0])
    with pytest.raises(InvalidInputError, match="already in the tokenizer"):
        ours.load_textual_inversion(files[0])
    with pytest.raises(InvalidInputError, match="one word"):
        ours.load_textual_inversion(files[2], token="two words")
    assert len(ours.tokenizer) == ours.text_encoder.get_input_embeddings().weight.shape[0]
