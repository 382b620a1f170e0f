"""Helpers that several test modules share: test modules import from here (or use the fixtures
in conftest.py), never from each other."""

from __future__ import annotations

import socket

import numpy as np
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from latentdiff.models.architectures import build_components

# The reference's scheduler for each of our names, written out independently of our registry.
REFERENCE_SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_sde_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}


def picture(width=64, height=48, seed=0) -> Image.Image:
    """A smooth test picture (gradients plus a square), different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 5.0)], -1) * 255
    rgb[height // 4 : height // 2, width // 4 : width // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(rgb.astype(np.uint8))


def png_header(path, width: int, height: int):
    """A PNG that declares width x height pixels but holds almost none: readers learn the size from
    the header (what a limit or PIL's decompression-bomb check looks at) without decoding anything."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    return path


def build_nets(architecture, empty: bool = False):
    """(unet, vae, text_encoder, tokenizer) of an architecture record, from the library's one builder."""
    parts = build_components(architecture, empty=empty)
    return parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]


def free_port() -> int:
    """A TCP port nobody listens on now (for torch.distributed rendezvous in multi-process tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NetworkUsed(RuntimeError):
    """What the ``no_network`` fixture raises for any attempt to connect or resolve a name."""
