"""The A1111-compatible subset (``/sdapi/v1/*``), so that existing clients work unchanged.

Requests go through the same checks and the same durable queue as native jobs; the answers have
A1111's shape: base64 PNGs (with our recipe and the A1111 infotext inside), ``parameters`` (the
request as understood) and ``info``, the JSON string that clients parse.

Mapping onto latentdiff:
- sampler: ``sampler_name`` (or ``sampler_index``) and ``scheduler`` -> a latentdiff sampler
  (``samplers.from_a1111``); a sampler with no equivalent is a 422 that names the field;
- seeds: ``seed`` -1 draws a random one; image i of the ``batch_size`` x ``n_iter`` images gets
  ``seed + i``, which is exactly our seed contract for an int seed;
- clip skip: A1111's ``CLIP_stop_at_last_layers`` N (an option, or in ``override_settings``) is our
  ``clip_skip`` N - 1;
- hires fix: ``enable_hr``, ``hr_scale``, ``hr_upscaler`` (Latent* -> latent, Lanczos -> pixel),
  ``denoising_strength`` -> ``hires_*``;
- img2img: one ``init_images`` entry, resized to width x height (resize mode 0); ``mask`` with
  ``mask_blur`` (Gaussian) and ``inpainting_mask_invert``; the whole picture is inpainted
  (``inpaint_full_res`` is not supported) and the masked area starts from the original picture.
Fields that would change the picture in ways latentdiff cannot (face restoration, tiling,
variation seeds, scripts, styles, refiners, ...) are refused by name when set; the others are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
from typing import Any, Optional

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .._version import __version__
from ..errors import InvalidInputError
from ..generation.infotext import parse_infotext
from ..generation.samplers import A1111_NAMES, _A1111_EXTRA, from_a1111, to_a1111
from .jobs import FieldError, body_hash, decode_image

# pipeline argument -> the A1111 field that carries it (422 answers name the latter)
A1111_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale", "height": "height", "width": "width", "seed": "seed", "scheduler": "sampler_name",
    "num_images_per_prompt": "batch_size", "strength": "denoising_strength", "hires_scale": "hr_scale",
    "hires_strength": "denoising_strength", "hires_upscale": "hr_upscaler", "clip_skip": "override_settings",
    "eta": "eta", "image": "init_images", "mask_image": "mask", "guidance_rescale": "cfg_scale",
}  # fmt: skip
DEFAULT_OPTIONS = {"sd_model_checkpoint": None, "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0,
                   "samples_format": "png", "enable_pnginfo": True}  # fmt: skip


class _Common(BaseModel):
    """Fields of A1111's processing API that both txt2img and img2img take (its documented names
    and defaults). Unknown fields are ignored, as A1111 does."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    s_churn: Optional[float] = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    script_name: Optional[str] = None
    script_args: list = Field(default_factory=list)
    alwayson_scripts: dict = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


class Txt2ImgRequest(_Common):
    enable_hr: bool = False
    denoising_strength: Optional[float] = None
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstphase_width: int = 0
    firstphase_height: int = 0


class Img2ImgRequest(_Common):
    init_images: list[str] = Field(..., description="base64 images; one is supported")
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: Optional[str] = None
    mask_blur: Optional[int] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str = Field(..., description="a base64 PNG")


# field -> the values that mean "not used" (anything else asks for something latentdiff cannot do)
_UNSUPPORTED = {
    "styles": ([],), "subseed_strength": (0, 0.0), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "restore_faces": (None, False), "tiling": (None, False), "s_churn": (None, 0, 0.0),
    "refiner_checkpoint": (None, "", "None"), "script_name": (None, "", "None"), "alwayson_scripts": ({},),
    "hr_second_pass_steps": (0,), "hr_resize_x": (0,), "hr_resize_y": (0,),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"), "hr_sampler_name": (None, "", "Use same sampler"),
    "hr_prompt": ("",), "hr_negative_prompt": ("",), "firstphase_width": (0,), "firstphase_height": (0,),
    "resize_mode": (0,), "initial_noise_multiplier": (None, 1, 1.0),
}  # fmt: skip


def a1111_call(body: _Common, server, img2img: bool) -> tuple[dict, dict, list[str]]:
    """(pipeline call, decoded images, comments) of an A1111 request."""
    from PIL import ImageFilter, ImageOps

    for name, unused in _UNSUPPORTED.items():
        value = getattr(body, name, unused[0])
        if value not in unused and not (name.startswith("hr_") and not getattr(body, "enable_hr", False)):
            raise FieldError(name, f"{name}={value!r} is not supported by latentdiff; leave it at {unused[0]!r}")
    settings = {**server.options, **body.override_settings}
    checkpoint = body.override_settings.get("sd_model_checkpoint")
    if checkpoint not in (None, "") and checkpoint not in model_titles(server):
        raise FieldError("override_settings", f"model {checkpoint!r} is not served here; GET /sdapi/v1/sd-models lists it")
    clip = settings.get("CLIP_stop_at_last_layers", 1)
    if not isinstance(clip, int) or isinstance(clip, bool) or clip < 1:
        raise FieldError("override_settings", f"CLIP_stop_at_last_layers must be a whole number of at least 1, got {clip!r}")
    sampler = body.sampler_name or body.sampler_index or "Euler"
    try:
        scheduler = from_a1111(sampler, body.scheduler if body.scheduler not in ("", None) else None)
    except InvalidInputError as e:
        raise FieldError("sampler_name" if body.sampler_name else "sampler_index", str(e)) from None
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) < 1:
            raise FieldError(name, f"{name} must be at least 1, got {getattr(body, name)}")
    call: dict[str, Any] = {
        "prompt": body.prompt, "negative_prompt": body.negative_prompt or None,
        "num_images_per_prompt": body.batch_size * body.n_iter, "num_inference_steps": body.steps,
        "guidance_scale": body.cfg_scale, "height": body.height, "width": body.width,
        "seed": secrets.randbelow(2**32) if body.seed == -1 else body.seed, "scheduler": scheduler,
        "clip_skip": clip - 1,
    }  # fmt: skip
    if scheduler == "ddim":
        eta = body.eta if body.eta is not None else settings.get("eta_ddim", 0.0)
        call["eta"] = eta
    images, comments = {}, []
    if not img2img and body.enable_hr:
        upscaler = body.hr_upscaler or "Latent"
        if upscaler.lower().startswith("latent"):
            call["hires_upscale"] = "latent"
        elif upscaler.lower() == "lanczos":
            call["hires_upscale"] = "pixel"
        else:
            raise FieldError("hr_upscaler", f"hr_upscaler {upscaler!r} is not available; use 'Latent' or 'Lanczos'")
        call["hires_scale"] = body.hr_scale
        call["hires_strength"] = 0.75 if body.denoising_strength is None else body.denoising_strength
    if img2img:
        if len(body.init_images) != 1:
            raise FieldError("init_images", f"give one init image (got {len(body.init_images)})")
        image = decode_image(body.init_images[0], "init_images", server.config.limits).convert("RGB")
        size = (body.width, body.height)
        images["image"] = image.resize(size, _lanczos()) if image.size != size else image  # resize mode 0
        call["strength"] = body.denoising_strength
        call["image"] = body.init_images[0]
        if body.mask is not None:
            mask = decode_image(body.mask, "mask", server.config.limits).convert("L")
            mask = mask.resize(size, _lanczos()) if mask.size != size else mask
            if body.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
            blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
            if blur > 0:
                mask = mask.filter(ImageFilter.GaussianBlur(blur))
            images["mask_image"] = mask
            call["mask_image"] = _b64png(mask)
            comments.append("inpainted over the whole picture, the masked area starting from the original")
        call["image"] = _b64png(images["image"])
    return call, images, comments


def _lanczos():
    from PIL import Image

    return Image.LANCZOS


def _b64png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def model_titles(server) -> list[str]:
    return [server.model_name, _title(server)]


def _title(server) -> str:
    return f"{server.model_name} [{server.pipe.weight_hash()[:10]}]"


def a1111_info(server, job: dict, images: list[dict], body: _Common, comments: list[str]) -> dict[str, Any]:
    """The ``info`` object of an A1111 answer (A1111's ``Processed.js()`` fields)."""
    from ..generation.infotext import format_infotext

    spec = job["spec"]
    sampler, schedule = to_a1111(spec["scheduler"])
    params = [im["params"] for im in images]
    return {
        "prompt": spec["prompt"], "all_prompts": [spec["prompt"]] * len(images),
        "negative_prompt": spec["negative_prompt"], "all_negative_prompts": [spec["negative_prompt"]] * len(images),
        "seed": spec["seeds"][0], "all_seeds": spec["seeds"], "subseed": -1, "all_subseeds": [-1] * len(images),
        "subseed_strength": 0, "width": spec["width"], "height": spec["height"], "sampler_name": sampler,
        "cfg_scale": spec["guidance_scale"], "steps": spec["num_inference_steps"], "batch_size": body.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": server.model_name,
        "sd_model_hash": server.pipe.weight_hash()[:10], "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": spec["strength"] if spec["strength"] is not None else spec["hires_strength"],
        "extra_generation_params": {"Schedule type": schedule}, "index_of_first_image": 0,
        "infotexts": [format_infotext(p) for p in params], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job["created"])),
        "clip_skip": spec["clip_skip"] + 1, "is_using_inpainting_conditioning":
            server.pipe.unet.config.in_channels != server.pipe.vae.config.latent_channels,
        "version": f"latentdiff {__version__}", "comments": "".join(f"{c}\n" for c in comments + job["warnings"]),
        "job_id": job["id"],
    }  # fmt: skip


def a1111_router(current) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible"])

    async def run(body: _Common, img2img: bool, idem_key: Optional[str]):
        s = current()
        call, images, comments = a1111_call(body, s, img2img)
        job, _, _ = await asyncio.to_thread(
            s.submit, call, images, kind="a1111", digest=body_hash(body), idem_key=idem_key, names=A1111_FIELDS
        )
        job = await s.wait(job["id"])
        if job["state"] != "done":
            raise HTTPException(500 if job["state"] == "failed" else 409,
                                f"job {job['id']} {job['state']}: {job['error'] or ''}".strip())  # fmt: skip
        images_ = s.queue.images(job["id"])
        encoded = [base64.b64encode((s.images_dir / im["file"]).read_bytes()).decode() for im in images_]
        return {
            "images": encoded if body.send_images else [],
            "parameters": body.model_dump(exclude={"init_images", "mask"}),
            "info": json.dumps(a1111_info(s, job, images_, body, comments)),
        }

    @r.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest, idempotency_key: Optional[str] = Header(None, max_length=200)):
        return await run(body, False, idempotency_key)

    @r.post("/img2img")
    async def img2img(body: Img2ImgRequest, idempotency_key: Optional[str] = Header(None, max_length=200)):
        return await run(body, True, idempotency_key)

    @r.post("/png-info")
    def png_info(body: PngInfoRequest):
        s = current()
        image = decode_image(body.image, "image", s.config.limits)
        text = image.info.get("parameters") or ""
        items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @r.get("/samplers")
    def samplers():
        out: dict[str, dict] = {}
        for ours, (label, schedule) in A1111_NAMES.items():
            entry = out.setdefault(label, {"name": label, "aliases": [], "options": {}})
            entry["aliases"].append(ours)
        for (label, schedule), ours in _A1111_EXTRA.items():
            out[label]["options"]["scheduler"] = A1111_NAMES[ours][1].lower()
        return list(out.values())

    @r.get("/sd-models")
    def sd_models():
        s = current()
        h = s.pipe.weight_hash()
        return [{"title": _title(s), "model_name": s.model_name, "hash": h[:10], "sha256": None,
                 "filename": s.model_name, "config": None}]  # fmt: skip

    @r.get("/progress")
    def progress(skip_current_image: bool = False):
        s = current()
        running = s.queue.jobs(states=("running",), limit=1)
        counts = s.queue.counts()
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": counts["queued"] + counts["running"],
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
        if not running:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        job = running[0]
        live = s.worker.progress.get(job["id"]) or {"step": 0, "steps": 1}
        made = len(s.queue.images(job["id"]))
        fraction = min((made + live["step"] / max(live["steps"], 1)) / job["total"], 1.0)
        elapsed = time.time() - (job["started"] or time.time())
        state.update(job=job["id"], job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job["created"])),
                     sampling_step=live["step"], sampling_steps=live["steps"])  # fmt: skip
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": None,
                "textinfo": f"step {live['step']} of {live['steps']}"}  # fmt: skip

    @r.get("/options")
    def get_options():
        s = current()
        return {**DEFAULT_OPTIONS, "sd_model_checkpoint": _title(s), **s.options}

    @r.post("/options")
    def set_options(body: dict[str, Any]):
        """Set the options that apply (``CLIP_stop_at_last_layers``, ``eta_ddim``; ``sd_model_checkpoint``
        must name the served model); the others are ignored and listed."""
        s = current()
        applied, ignored = {}, []
        for key, value in body.items():
            if key == "sd_model_checkpoint":
                if value not in model_titles(s):
                    raise FieldError(key, f"model {value!r} is not served here; GET /sdapi/v1/sd-models lists it")
            elif key == "CLIP_stop_at_last_layers":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise FieldError(key, f"{key} must be a whole number of at least 1, got {value!r}")
                applied[key] = value
            elif key == "eta_ddim":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                    raise FieldError(key, f"{key} must be a number from 0 to 1, got {value!r}")
                applied[key] = float(value)
            else:
                ignored.append(key)
        s.options.update(applied)
        s.save_options()
        return JSONResponse({"applied": sorted(applied), "ignored": ignored})

    return r

