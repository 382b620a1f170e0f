"""Control images made from pictures: what a ControlNet is conditioned on.

:func:`canny` is OpenCV's Canny edge detector (Canny 1986): white edges on black, as the Canny
ControlNets were trained on. Any other picture a user brings (a depth map, a pose drawing, a
scribble, a silhouette) is a control image as it is: ``control_image=`` takes any RGB picture.
OpenCV is an optional dependency: ``pip install "latentdiff[control]"``.
"""

from __future__ import annotations

import numpy as np

from ..checks import whole_number
from ..errors import InvalidInputError
from .images import ImageInput, load_image

ANNOTATORS = ("canny",)


def canny(image: ImageInput, low: int = 100, high: int = 200):
    """The Canny edges of ``image`` (a path or PIL image) as an RGB PIL image of the same size.

    ``low`` / ``high`` are the hysteresis thresholds on the gradient magnitude (0-255 scale; an edge
    starts above ``high`` and continues above ``low``); 100 / 200 are what the Canny ControlNets'
    training data used.
    """
    from PIL import Image

    cv2 = _opencv()
    for value, name in ((low, "low"), (high, "high")):
        if whole_number(value) is None or not 0 <= value <= 1000:
            raise InvalidInputError(f"canny {name} threshold must be a whole number from 0 to 1000, got {value!r}")
    if low > high:
        raise InvalidInputError(f"canny thresholds: low ({low}) must not be above high ({high})")
    grey = np.asarray(load_image(image).convert("L"))  # (H, W) uint8
    edges = cv2.Canny(grey, int(low), int(high))  # (H, W) uint8, 255 on edges
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def make_control_image(kind: str, image: ImageInput, **options):
    """A control image of ``kind`` (one of ``ANNOTATORS``) from ``image``."""
    if kind not in ANNOTATORS:
        raise InvalidInputError(f"unknown control image kind {kind!r}; choose one of: {', '.join(ANNOTATORS)}")
    return {"canny": canny}[kind](image, **options)


def _opencv():
    try:
        import cv2
    except ImportError:
        raise InvalidInputError('control images need OpenCV: pip install "latentdiff[control]" '
                                "(opencv-python-headless)") from None  # fmt: skip
    return cv2


__all__ = ["canny", "make_control_image", "ANNOTATORS"]
