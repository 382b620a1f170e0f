"""Argument checks shared by the pipeline, the CLI and batch files: each error says what to do."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional

from .errors import InvalidInputError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit unsigned value


def whole_number(value) -> Optional[int]:
    """``value`` as an int if it is a whole number (Python or numpy integer, not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def positive_int(value, name: str) -> int:
    n = whole_number(value)
    if n is None or n < 1:
        raise InvalidInputError(f"{name} must be a whole number of at least 1, got {value!r}")
    return n


def check_size(name: str, value, multiple: int) -> int:
    n = whole_number(value)
    if n is None or n < multiple or n % multiple:
        hint = ""
        if n is not None and n >= multiple:
            lower = n // multiple * multiple
            hint = f" (try {lower} or {lower + multiple})"
        raise InvalidInputError(f"{name} must be a positive multiple of {multiple}, got {value!r}{hint}")
    return n


def check_float(value, name: str, low: float, high: Optional[float], hint: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InvalidInputError(f"{name} must be a finite number {span}, got {value!r}; {hint}")
    return float(value)


def check_text(value, name: str) -> str:
    """A prompt-like string that can be encoded as UTF-8: no lone surrogates, which is what a
    command-line argument or a JSON string carrying invalid UTF-8 becomes."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            f"{name} is not valid text: invalid UTF-8 (a lone surrogate {value[e.start]!r}) at character {e.start}; "
            "save the text as UTF-8"
        ) from None
    return value


# Precisions a model can be loaded, cast or run in, by name.
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def torch_dtype(value, name: str = "dtype"):
    """``value`` (a torch.dtype, or a name from ``DTYPE_NAMES``) as a torch.dtype; None stays None."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPE_NAMES:
        return getattr(torch, value.removeprefix("torch."))
    raise InvalidInputError(f"{name} must be a torch.dtype or one of {', '.join(DTYPE_NAMES)}, got {value!r}")


@dataclass(frozen=True)
class Limits:
    """The most one pipeline call may ask for (``pipe.limits``; ``--limit NAME=VALUE`` on the command line).

    Beyond them a request would run for hours or exhaust memory rather than fail; they are checked
    before any work, and each can be raised when the hardware allows it.
    """

    pixels: int = 2048 * 2048  # per output image, after hires: width x height
    steps: int = 1000  # denoising steps
    images: int = 64  # images per call (prompts x images per prompt; batch: --batch-size)
    input_pixels: int = 8192 * 8192  # per input picture (image-to-image, inpainting masks)
    prompt_chars: int = 20_000  # characters per prompt (about 250 chunks of 75 tokens would already be slow)

    @classmethod
    def parse(cls, specs) -> "Limits":
        """``["steps=2000", "pixels=4096x4096"]`` (the CLI's ``--limit``) -> Limits."""
        values = {}
        names = [f.name for f in fields(cls)]
        for spec in specs or []:
            key, sep, text = str(spec).partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise InvalidInputError(f"--limit takes NAME=VALUE with NAME one of {', '.join(names)}, got {spec!r}")
            text = text.strip().lower()
            try:
                number = math.prod(int(v) for v in text.split("x")) if "pixels" in key else int(text)
            except ValueError:
                raise InvalidInputError(f"--limit {key} must be a whole number{' or WxH' if 'pixels' in key else ''}, got {text!r}") from None
            values[key] = number
        return cls(**values).checked()

    def checked(self) -> "Limits":
        for f in fields(self):
            positive_int(getattr(self, f.name), f"limit {f.name}")
        return self

    def exceeded(self, what: str, value, hint: str = "") -> InvalidInputError:
        """The error for ``value`` above the limit ``what``: says how to raise it."""
        limit = getattr(self, what)
        return InvalidInputError(
            f"{value} is above the limit {what}={limit}{'; ' + hint if hint else ''} "
            f"(raise it with --limit {what}=N, or pipe.limits = Limits({what}=N), if the machine can take it)"
        )
