"""Presets: real SD shapes (checked against the published parameter counts), seeded random weights."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights

from latentdiff import InvalidInputError, LatentDiffusion
from latentdiff.models.architectures import PRESETS, build_components

# Parameter counts of the released Stable Diffusion checkpoints (diffusers layout).
PUBLISHED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    # SDXL base 1.0 and refiner 1.0: OpenCLIP bigG with its projection as text_encoder_2
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "sdxl-refiner": {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder_2": 694_659_840},
}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_real_architectures_have_the_published_sizes(name):
    with init_empty_weights():  # shapes only: no memory, no time
        parts = build_components(name)
    assert {k: count(parts[k]) for k in PUBLISHED[name]} == PUBLISHED[name]


def test_sd21_is_v_prediction_with_openclip_padding():
    with init_empty_weights():
        parts = build_components("sd21")
    assert parts["scheduler_config"]["prediction_type"] == "v_prediction"
    assert parts["tokenizer"].pad_token_id == 0
    assert parts["unet"].config.sample_size * 8 == 768


def test_sdxl_presets_are_sdxl_shaped():
    with init_empty_weights():
        base, refiner = build_components("sdxl"), build_components("sdxl-refiner")
    assert refiner["text_encoder"] is None and refiner["tokenizer"] is None
    assert base["tokenizer_2"].pad_token == "!" and base["tokenizer"].pad_token == "<|endoftext|>"
    assert base["unet"].config.sample_size * 8 == 1024 and base["vae"].config.scaling_factor == 0.13025
    assert base["scheduler_config"]["_class_name"] == "EulerDiscreteScheduler"


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_components("tiny", seed=s)["unet"].state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_preset_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    LatentDiffusion.from_preset("tiny", seed=3)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_describes_itself(tiny):
    info = tiny.describe()
    assert info["source"] == {"preset": "tiny", "seed": 0}
    assert info["default_size"] == [64, 64]
    assert info["components"]["unet"]["parameters"] == count(tiny.unet)
    assert len(info["weight_hash"]) == 16


def test_the_suite_refuses_random_weights_of_real_width():
    """conftest.py's guard (a real-size request such as from_preset("sdxl") would be 13.9 GB; this one, if
    the guard failed, a few hundred MB)."""
    from helpers import RealSizeModel
    from latentdiff.models import architectures

    with pytest.raises(RealSizeModel, match="'tiny'.*320 channels"):
        architectures.build_components("tiny", overrides={"unet": {"block_out_channels": [320, 320]}})
    assert architectures.build_components("tiny", overrides={"unet": {"block_out_channels": [320, 320]}}, empty=True)


def test_unknown_preset_lists_the_names():
    with pytest.raises(InvalidInputError, match=", ".join(PRESETS)):
        LatentDiffusion.from_preset("sd3")
