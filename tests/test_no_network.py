"""Loading, generating, saving and the CLI work with every network connection refused."""

from __future__ import annotations

import socket

import pytest

from latentdiff import LatentDiffusion
from latentdiff.cli import main


def test_the_blocker_blocks(no_network):
    from helpers import NetworkUsed

    with pytest.raises(NetworkUsed):
        socket.create_connection(("127.0.0.1", 9))


def test_everything_offline(no_network, tiny_dir, tmp_path):
    pipe = LatentDiffusion.from_pretrained(tiny_dir)
    pipe("a cat", seed=1, num_inference_steps=2, scheduler="lms").save(tmp_path / "cat.png")
    pipe.save_pretrained(tmp_path / "copy")
    LatentDiffusion.from_preset("tiny", seed=1)
    assert main(["generate", "--from-png", str(tmp_path / "cat.png"), "-o", str(tmp_path / "again.png"), "--no-progress"]) == 0
    assert main(["info", str(tmp_path / "copy")]) == 0
