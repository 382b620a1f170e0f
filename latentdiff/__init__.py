"""latentdiff: Stable-Diffusion-style latent text-to-image generation, offline and reproducible.

The root is lazy (PEP 562): ``import latentdiff`` and ``latentdiff --help`` import neither torch
nor diffusers nor transformers; ``latentdiff.LatentDiffusion`` imports the pipeline on first use.
"""

from importlib import import_module

from ._version import __version__
from .errors import InvalidInputError, LatentDiffusionError, MissingFileError, NonFiniteResultError

# name -> module that defines it, imported when the name is first read
_LAZY = {
    "LatentDiffusion": ".generation.pipeline",
    "GenerationResult": ".generation.result",
    "call_kwargs": ".generation.recipe",
    "canny": ".generation.control_images",
}

__all__ = [
    "GenerationResult",
    "InvalidInputError",
    "LatentDiffusion",
    "LatentDiffusionError",
    "MissingFileError",
    "NonFiniteResultError",
    "call_kwargs",
    "canny",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later reads do not come back here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
