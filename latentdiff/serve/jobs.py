"""Job bodies: their types (pydantic), their limits, and their checks before anything is queued.

A body is first typed by pydantic (wrong types and unknown fields: 422 naming the field), then
held against the server's limits, then checked exactly as a pipeline call would check it, by
``generation.request.Request.resolve`` (the one place where pipeline arguments are checked). What
is stored is the resolved call: sizes filled in, one seed per image (a missing seed is drawn now,
so a job made again after a crash gives the same images), input images as the base64 they came in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidInputError
from .config import Limits

# the pipeline arguments a job carries (besides prompt and seeds), stored in its spec
CALL_FIELDS = ("negative_prompt", "num_inference_steps", "guidance_scale", "guidance_rescale", "height", "width",
               "scheduler", "eta", "clip_skip", "strength", "hires_scale", "hires_strength", "hires_upscale")  # fmt: skip
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.I)


class FieldError(InvalidInputError):
    """A request field that is not acceptable: answered with 422 and the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class JobRequest(BaseModel):
    """``POST /v1/jobs`` and ``POST /v1/generate``: the arguments of a pipeline call, by their names
    in ``LatentDiffusion.__call__``, for one prompt. Images are inline base64 (PNG, JPEG, WebP)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="the prompt; weighting syntax and BREAK as in the Python API")
    negative_prompt: Optional[str] = None
    num_images_per_prompt: int = Field(1, description="images in the job; image i gets seed + i")
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    height: Optional[int] = Field(None, description="pixels, a multiple of 8 (default: the model's size)")
    width: Optional[int] = None
    seed: Union[int, list[int], None] = Field(None, description="an int (image i gets seed + i), one per image, or none (random)")
    scheduler: Optional[str] = Field(None, description="a latentdiff sampler name (dpmpp_2m_karras) or an A1111 one (DPM++ 2M Karras)")
    eta: float = 0.0
    clip_skip: int = 0
    image: Optional[str] = Field(None, description="image-to-image input, base64")
    mask_image: Optional[str] = Field(None, description="inpainting mask, base64: white is repainted")
    strength: Optional[float] = None
    hires_scale: Optional[float] = None
    hires_strength: Optional[float] = None
    hires_upscale: Optional[Literal["latent", "pixel"]] = None
    model: Optional[str] = Field(None, description="a name from GET /v1/models (default: the one model served)")


def body_hash(body: BaseModel) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()


def open_base64(data: str, check=None):
    """A base64 image (a data: URL prefix is allowed) as a loaded PIL image; ``check(image)`` runs
    once the header is read, before the pixels are decoded."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(_DATA_URL.sub("", data.strip()), validate=True)))
    if check is not None:
        check(image)
    image.load()
    return image


def decode_image(data: str, field: str, limits: Limits):
    """A base64 image from a request as a loaded PIL image, or a FieldError."""
    from PIL import Image, UnidentifiedImageError

    def small_enough(image):
        if max(image.size) > limits.max_side:
            raise FieldError(field, f"{field} is {image.width}x{image.height} pixels; this server takes at most "
                                    f"{limits.max_side} on a side")  # fmt: skip

    try:
        return open_base64(data, small_enough)
    except FieldError:
        raise
    except (binascii.Error, ValueError):
        raise FieldError(field, f"{field} must be an image encoded as base64 (PNG, JPEG or WebP); file paths and URLs "
                                "are not accepted") from None  # fmt: skip
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise FieldError(field, f"{field} is not a readable image ({e})") from None


def check_limits(call: dict[str, Any], limits: Limits, names: dict[str, str]) -> None:
    """The server's limits on a call's arguments; ``names`` maps argument names to the body's field names."""

    def over(arg: str, value, limit, what: str):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
            raise FieldError(names.get(arg, arg), f"{names.get(arg, arg)} is {value}; this server allows at most {limit} {what}")

    over("num_inference_steps", call.get("num_inference_steps"), limits.max_steps, "steps")
    over("num_images_per_prompt", call.get("num_images_per_prompt"), limits.max_images, "images per job")
    for side in ("height", "width"):
        value = call.get(side)
        over(side, value, limits.max_side, "pixels")
        scale = call.get("hires_scale")
        if isinstance(value, int) and isinstance(scale, (int, float)) and value * scale > limits.max_side:
            raise FieldError(names.get("hires_scale", "hires_scale"),
                             f"{side} {value} upscaled by {scale} is {value * scale:g} pixels; this server allows at "
                             f"most {limits.max_side}")  # fmt: skip
    for arg in ("prompt", "negative_prompt"):
        text = call.get(arg)
        if isinstance(text, str) and len(text) > limits.max_prompt:
            raise FieldError(names.get(arg, arg), f"{names.get(arg, arg)} has {len(text)} characters; this server "
                                                  f"allows at most {limits.max_prompt} characters")  # fmt: skip


def field_of(message: str, names: dict[str, str]) -> str:
    """The body field an InvalidInputError from ``Request.resolve`` is about (the argument it names)."""
    for arg in sorted(names, key=len, reverse=True):
        if re.search(rf"\b{re.escape(arg)}\b", message):
            return names[arg]
    return "body"


def prepare(pipe, call: dict[str, Any], images: dict[str, Any], limits: Limits, names: dict[str, str]):
    """Check a call (pipeline arguments; input pictures decoded in ``images``) and return
    (spec, batch key, number of images, warnings). Raises FieldError."""
    import warnings

    from ..generation.prompts import count_chunks
    from ..generation.request import Request

    check_limits(call, limits, names)
    arguments = {
        "prompt": call["prompt"], "negative_prompt": call.get("negative_prompt"),
        "num_images_per_prompt": call.get("num_images_per_prompt", 1),
        "num_inference_steps": call.get("num_inference_steps", 50), "guidance_scale": call.get("guidance_scale", 7.5),
        "guidance_rescale": call.get("guidance_rescale", 0.0), "height": call.get("height"), "width": call.get("width"),
        "seed": call.get("seed"), "scheduler": call.get("scheduler"), "eta": call.get("eta", 0.0),
        "output_type": "pil", "callback": None, "progress": False, "clip_skip": call.get("clip_skip", 0),
        "prompt_embeds": None, "negative_prompt_embeds": None, "image": images.get("image"),
        "strength": call.get("strength"), "mask_image": images.get("mask_image"),
        "hires_scale": call.get("hires_scale"), "hires_strength": call.get("hires_strength"),
        "hires_upscale": call.get("hires_upscale"),
    }  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            request = Request.resolve(pipe, **arguments)
        except InvalidInputError as e:
            raise FieldError(field_of(str(e), names), str(e)) from None
    check_limits({"height": request.height, "width": request.width, "hires_scale": request.hires_scale}, limits, names)
    spec = {
        "prompt": request.prompts[0], "negative_prompt": request.negatives[0], "seeds": request.seeds,
        "num_inference_steps": request.steps, "guidance_scale": request.guidance_scale,
        "guidance_rescale": request.guidance_rescale, "height": request.height, "width": request.width,
        "scheduler": request.scheduler, "eta": request.eta, "clip_skip": request.clip_skip,
        "strength": request.strength, "hires_scale": request.hires_scale, "hires_strength": request.hires_strength,
        "hires_upscale": request.hires_upscale,
        "image": call.get("image"), "mask_image": call.get("mask_image"),
    }  # fmt: skip
    # Images share a U-Net batch only when every argument that reaches the U-Net, the scheduler or
    # the decoder is equal, and their prompts have equal lengths in 77-token chunks (one group).
    tok = pipe.encoders[0][0]  # (SDXL's tokenizers split text alike: one count)
    chunks = count_chunks(tok, spec["prompt"])
    if request.guided:
        chunks = max(chunks, count_chunks(tok, spec["negative_prompt"]))
    shared = {k: spec[k] for k in CALL_FIELDS if k != "negative_prompt"}
    mode = "inpaint" if spec["mask_image"] else "img2img" if spec["image"] else "txt2img"
    key = json.dumps({"mode": mode, "chunks": chunks, **shared}, sort_keys=True)
    return spec, key, request.total, [str(w.message) for w in caught]


def native_call(body: JobRequest, limits: Limits, model_names: list[str]) -> tuple[dict, dict]:
    """(call arguments, decoded images) of a native body; the model must be one that is served."""
    if body.model is not None and body.model not in model_names:
        raise FieldError("model", f"model {body.model!r} is not served here; GET /v1/models lists {', '.join(model_names)}")
    call = body.model_dump(exclude={"model", "image", "mask_image"}, exclude_none=True)
    if body.scheduler is not None:
        from ..generation.samplers import from_a1111

        try:
            call["scheduler"] = from_a1111(body.scheduler)
        except InvalidInputError as e:
            raise FieldError("scheduler", str(e)) from None
    images = {}
    for field in ("image", "mask_image"):
        value = getattr(body, field)
        if value is not None:
            images[field] = decode_image(value, field, limits)
            call[field] = value
    return call, images
