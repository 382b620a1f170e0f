"""Helpers that several test modules share: test modules import from here (or use the fixtures
in conftest.py), never from each other."""

from __future__ import annotations

import socket
from pathlib import Path

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


# A prompts file's rows for batch tests: 7 images, with a row's own seed and id, and rows that cannot share a call.
BATCH_ROWS = [
    {"prompt": "a red apple", "n": 2},
    {"prompt": "a lighthouse", "seed": 40, "id": "house"},
    {"prompt": "a bowl of soup", "negative_prompt": "blurry", "steps": 3},
    {"prompt": "a fox", "guidance": 3.0, "scheduler": "euler_a", "n": 2},
    {"prompt": "a tall tower", "width": 48, "height": 64},
]


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


def train_in_two_processes(config: Path, settings: list[str], timeout: int = 900):
    """``torchrun --nproc_per_node 2 training/train.py --config CONFIG --set ...`` at one CPU thread per
    process (the multi-process tests compare it with a run in this process); the finished process."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(root / "training" / "train.py"), "--config", str(config)]  # fmt: skip
    for item in settings:
        command += ["--set", item]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


class NetworkUsed(RuntimeError):
    """What the ``no_network`` fixture raises for any attempt to connect or resolve a name."""


class Server:
    """``latentdiff serve`` in a subprocess on 127.0.0.1 and a free port, for tests that talk to it
    over HTTP. ``start()`` returns once ``/v1/health`` answers; ``kill()`` sends SIGKILL."""

    def __init__(self, data, *args: str, token: str | None = None):
        self.data, self.args, self.token = data, list(args), token
        self.process = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "Server":
        import os
        import subprocess
        import sys
        import time

        import httpx2

        command = [sys.executable, "-m", "latentdiff", "serve", "--preset", "tiny", "--port", str(self.port),
                   "--data", str(self.data), *self.args] + (["--token", self.token] if self.token else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = open(self.data.parent / f"{self.data.name}-server.log", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.read_log()[-3000:]}")
            try:
                if self.client().get("/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout} s: {self.read_log()[-3000:]}")

    def client(self, token: str | None = None, **kwargs):
        import httpx2

        token = token or self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx2.Client(base_url=self.url, timeout=120, trust_env=False, headers=headers, **kwargs)

    def read_log(self) -> str:
        return (self.data.parent / f"{self.data.name}-server.log").read_text(errors="replace")

    def kill(self) -> None:
        import signal

        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except Exception:
                self.process.kill()
                self.process.wait(30)
        if self.process is not None:
            self.log.close()


def wait_for(client, job_id: str, timeout: float = 120.0) -> dict:
    """Poll ``GET /v1/jobs/{id}`` until the job has finished; returns it."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def png_pixels(data: bytes):
    """The pixels of PNG bytes as an (H, W, 3) uint8 array."""
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class RealSizeModel(AssertionError):
    """What the suite raises when a test asks for random weights of a real-size architecture (conftest.py)."""
