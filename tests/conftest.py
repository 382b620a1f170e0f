"""Shared fixtures: one seeded tiny model, its folder on disk, diffusers' pipeline on it."""

from __future__ import annotations

import socket

import pytest

from helpers import NetworkUsed, RealSizeModel
from latentdiff import LatentDiffusion


@pytest.fixture(scope="session", autouse=True)
def _tiny_weights_only():
    """Tests make random weights of tiny architectures only; real shapes (SD 1.x / 2.x / SDXL) are built on
    the meta device (``build_components(..., empty=True)``), which costs no memory. Random weights of SDXL's
    shapes are 3.47 billion float32 numbers, 13.9 GB: that is how a run of the SDXL tests once reached
    about 20 GB, when test_presets.py still asked ``from_preset("sdxl")`` for an unknown-preset error after
    ``sdxl`` had become a real preset. Such a request now fails at once, naming the architecture."""
    from latentdiff.models import architectures, single_file

    build = architectures.build_components

    def guarded(architecture, seed=0, overrides=None, *, empty=False):
        arch = architectures.get_preset(architecture) if isinstance(architecture, str) else architecture
        widest = max(arch.with_overrides(overrides).unet["block_out_channels"])
        if not empty and widest >= 320:  # SD's and SDXL's U-Nets start at 320 channels; the test presets at 32
            raise RealSizeModel(f"a test asked for random weights of {arch.name!r} (U-Net {widest} channels wide): "
                                "use a tiny preset, or build_components(..., empty=True) for shapes only")  # fmt: skip
        return build(architecture, seed, overrides, empty=empty)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(architectures, "build_components", guarded)
        patch.setattr(single_file, "build_components", guarded)  # (imported there by name)
        yield


@pytest.fixture(scope="session")
def tiny() -> LatentDiffusion:
    """Random tiny weights (seed 0). Tests must not change it in place."""
    return LatentDiffusion.from_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model written by our save_pretrained."""
    return tiny.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def _reference_pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def reference(_reference_pipe, tiny_dir):
    """diffusers' own StableDiffusionPipeline on the same weights: the independent reference.

    Its scheduler is loaded afresh from the folder for every test, as tests swap it.
    """
    from diffusers import PNDMScheduler

    _reference_pipe.scheduler = PNDMScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    return _reference_pipe


@pytest.fixture
def no_network(monkeypatch):
    """Make every attempt to open a network connection (or resolve a name) fail loudly."""

    def refuse(*args, **kwargs):
        raise NetworkUsed(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
