"""The server's settings: where it listens, who may call it, what it runs, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InvalidInputError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the answer is a 4xx that names the field."""

    max_side: int = 2048  # pixels, width and height (also after hires upscaling)
    max_steps: int = 150
    max_images: int = 16  # per job
    max_prompt: int = 4000  # characters, prompt and negative prompt each
    max_body: int = 32 * 2**20  # bytes of one request body (images come inline, base64)
    max_queued: int = 1000  # jobs waiting; more gives 429


@dataclass(frozen=True)
class ServeConfig:
    data: Path  # queue database, images, options
    model: Optional[str] = None  # model folder or single file; None with no preset: the embedded default model
    preset: Optional[str] = None
    preset_seed: int = 0
    host: str = "127.0.0.1"
    port: int = 7860
    token: Optional[str] = None
    batch_size: int = 1  # images per U-Net call; every call has exactly this many (see worker.py)
    device: str = "cpu"
    dtype: str = "float32"
    keep_hours: float = 168.0  # finished jobs and their images are kept this long
    limits: Limits = field(default_factory=Limits)

    def check(self) -> "ServeConfig":
        if self.host not in LOOPBACK and not self.token:
            raise InvalidInputError(
                f"--host {self.host} makes the server reachable from other machines; give --token TOKEN too "
                "(every request must then send 'Authorization: Bearer TOKEN')"
            )
        if self.batch_size < 1:
            raise InvalidInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.keep_hours <= 0:
            raise InvalidInputError(f"--keep-hours must be positive, got {self.keep_hours}")
        if not 0 <= self.port <= 65535:
            raise InvalidInputError(f"--port must be from 0 to 65535, got {self.port}")
        return self
