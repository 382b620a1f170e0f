"""latentdiff: Stable-Diffusion-style latent text-to-image generation, offline and reproducible."""

__version__ = "0.1.0"

from .errors import InvalidInputError, LatentDiffusionError, MissingFileError  # noqa: E402
from .pipeline import GenerationResult, LatentDiffusion, call_kwargs  # noqa: E402

__all__ = [
    "GenerationResult",
    "InvalidInputError",
    "LatentDiffusion",
    "LatentDiffusionError",
    "MissingFileError",
    "call_kwargs",
    "__version__",
]
