"""Image recipes: what is needed to make an image again, stored inside its PNG.

Every image of a call gets a recipe, its ``params`` (:func:`image_params`): prompt, negative
prompt, seed, steps, guidance, scheduler, size, model source and weight hash, LoRAs and
embeddings, input images, library version. A PNG written by latentdiff carries it in one ``tEXt``
chunk, key ``latentdiff``, as JSON (:func:`save_png`, :func:`read_recipe`), and beside it the same
settings as A1111 infotext (``parameters``, see ``infotext.py``) for other tools; :func:`call_kwargs` turns
it back into the call that remakes the image, and :func:`remake_differences` says when a remake
cannot promise the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import InvalidInputError, MissingFileError
from ..fileio import atomic_write

PNG_KEY = "latentdiff"
# Keys of an image's params that are also arguments of LatentDiffusion.__call__.
CALL_KEYS = (
    "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
    "guidance_rescale", "scheduler", "eta", "height", "width", "clip_skip", "image", "strength",
    "hires_scale", "hires_strength", "hires_upscale", "mask_image", "cache_interval", "cache_branch",
    "control_image", "control_scale", "control_start", "control_end", "ip_image", "ip_scale",
    # SDXL
    "prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
    "negative_original_size", "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
    "negative_aesthetic_score", "denoising_start", "denoising_end",
)  # fmt: skip


def image_params(pipe, request) -> list[dict[str, Any]]:
    """One recipe per image of ``request`` (a ``Request``) run on ``pipe``, in image order."""
    from .._version import __version__
    from .images import image_hash

    base = {
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "guidance_rescale": request.guidance_rescale,
        "scheduler": request.scheduler,
        "scheduler_class": request.scheduler_class,
        "clip_skip": request.clip_skip,
        "eta": request.eta,
        "height": request.height,
        "width": request.width,
        "model": pipe.source,
        "model_hash": pipe.weight_hash(),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "device": pipe.device.type,
        # Kernels round differently at other batch sizes (~1e-6): an image remade alone from a
        # batch may differ by one pixel level. Recorded so a remake can say so.
        "batch_size": request.total,
        "latentdiff_version": __version__,
    }
    if pipe.loras.adapters:  # not in the weight hash unless fused: recorded so a remake can reapply them
        base["loras"] = pipe.loras.records()
    if pipe.embeddings:
        base["embeddings"] = [e.record() for e in pipe.embeddings]
    if request.images is not None:
        base["strength"] = request.strength
    if request.hires_scale is not None:
        base.update(hires_scale=request.hires_scale, hires_strength=request.hires_strength,
                    hires_upscale=request.hires_upscale)  # fmt: skip
    if request.control_images is not None:  # the controls by their weights, the call's values one per control
        base.update(controls=pipe.controls.records(), control_scale=request.control_scales,
                    control_start=request.control_starts, control_end=request.control_ends)  # fmt: skip
    if request.ip_images is not None:
        base.update(ip_adapter=pipe.controls.ip.record(), ip_scale=request.ip_scale)
    # SDXL: what was given (the rest follows from the size, as it did here)
    base.update({k: list(v) if isinstance(v, tuple) else v for k, v in (request.micro or {}).items() if v is not None})
    for key in ("denoising_start", "denoising_end"):
        if getattr(request, key) is not None:
            base[key] = getattr(request, key)
    if request.cache_interval is not None:  # feature caching changes the image: part of the recipe
        base.update(cache_interval=request.cache_interval, cache_branch=request.cache_branch)
    if request.guidance_embedding_dim is not None:  # an LCM-distilled U-Net: guidance_scale went in as an embedding
        base["guidance_embedding"] = True
    n = request.n
    params = [
        {"prompt": request.prompts[i // n], "negative_prompt": request.negatives[i // n], "seed": seed, **base}
        for i, seed in enumerate(request.seeds)
    ]
    for key, texts in (("prompt_2", request.prompts_2), ("negative_prompt_2", request.negatives_2)):
        if texts is not None:
            for i, p in enumerate(params):
                p[key] = texts[i // n]
    if request.images is not None:  # which input each image came from (a path, or only its hash)
        names = request.per_image(request.image_names) or [None] * request.total  # (latents have no file)
        for p, name, image in zip(params, names, request.per_image(request.images)):
            p["image"], p["image_hash"] = name, image_hash(image)
        if request.masks is not None:
            for p, name, mask in zip(params, request.per_image(request.mask_names), request.per_image(request.masks)):
                p["mask_image"], p["mask_hash"] = name, image_hash(mask)
    if request.control_images is not None:  # each image's control pictures, one per control: file and pixel hash
        names = [request.per_image(entry) for entry in request.control_image_names]
        pictures = [request.per_image(entry) for entry in request.control_images]
        hashes: dict[int, str] = {}  # (a picture shared by many images is hashed once)
        for i, p in enumerate(params):
            p["control_image"] = [column[i] for column in names]
            p["control_image_hash"] = [hashes.setdefault(id(column[i]), image_hash(column[i])) for column in pictures]
    if request.ip_images is not None:
        for p, name, picture in zip(params, request.per_image(request.ip_image_names), request.per_image(request.ip_images)):
            p["ip_image"], p["ip_image_hash"] = name, image_hash(picture)
    return params


def save_png(image, path: str | Path, params: dict[str, Any], *, exclusive: bool = False) -> Path:
    """Write ``image`` (PIL) to ``path`` atomically, with ``params`` as its recipe.

    With ``exclusive``, raise ``FileExistsError`` rather than replace an existing file.
    """
    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as f:
        f.write(png_bytes(image, params))
    return path


def png_bytes(image, params: dict[str, Any]) -> bytes:
    """``image`` (PIL) as PNG bytes with ``params`` as its recipe and as A1111 infotext."""
    import io

    from PIL import PngImagePlugin

    from .infotext import PNG_KEY as INFOTEXT_KEY
    from .infotext import format_infotext

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(params, sort_keys=True))
    if params.get("prompt") is not None:  # (prompt_embeds have no text to show)
        info.add_text(INFOTEXT_KEY, format_infotext(params))  # tEXt, or UTF-8 iTXt where Latin-1 cannot hold it
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_recipe(path: str | Path, data: Optional[bytes] = None) -> dict[str, Any]:
    """The recipe stored in a PNG that latentdiff wrote (``data``: its bytes, already read from ``path``)."""
    recipe, _ = read_png(path, data)
    if recipe is None:
        raise InvalidInputError(f"{path} has no latentdiff recipe; only PNGs written by latentdiff can be remade")
    return recipe


def read_png(path: str | Path, data: Optional[bytes] = None) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """The latentdiff recipe (None if the PNG has none) and the A1111 infotext (None if none) of a PNG
    (``data``: its bytes, already read from ``path``, a local path or a URL)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if data is None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path} does not exist; give a PNG that latentdiff wrote")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:  # text chunks before the pixels are read without decoding
            if im.format != "PNG":
                raise InvalidInputError(f"{path} is a {im.format} image, not a PNG that latentdiff wrote")
            text, infotext = im.info.get(PNG_KEY), im.info.get("parameters")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InvalidInputError(f"cannot read {path} as a PNG ({e}); give a PNG that latentdiff wrote") from None
    infotext = infotext if isinstance(infotext, str) and infotext.strip() else None
    if text is None:
        return None, infotext
    try:
        recipe = json.loads(text)
    except ValueError:
        raise InvalidInputError(f"the recipe in {path} is not valid JSON; the file was edited or damaged") from None
    if not isinstance(recipe, dict) or "prompt" not in recipe or "seed" not in recipe:
        raise InvalidInputError(f"the recipe in {path} lacks a prompt or seed; the file was edited or damaged")
    _check_recipe_fields(recipe, path)
    return recipe, infotext


def _check_recipe_fields(recipe: dict[str, Any], path) -> None:
    """The parts of a recipe that are not call arguments (those are checked as any call's are):
    the model, the LoRAs, the dtype, the batch size. A wrong type means an edited or damaged file."""
    from ..checks import whole_number

    def bad(what: str):
        return InvalidInputError(f"the recipe in {path} has {what}; the file was edited or damaged")

    model = recipe.get("model")
    if model is not None:
        if not isinstance(model, dict):
            raise bad(f"a model entry that is not an object ({model!r})")
        for key in ("path", "preset", "variant"):
            if model.get(key) is not None and not isinstance(model[key], str):
                raise bad(f"a model {key} that is not text ({model[key]!r})")
    if recipe.get("dtype") is not None and not isinstance(recipe["dtype"], str):
        raise bad(f"a dtype that is not text ({recipe['dtype']!r})")
    if recipe.get("batch_size") is not None and whole_number(recipe["batch_size"]) is None:
        raise bad(f"a batch_size that is not a whole number ({recipe['batch_size']!r})")
    loras = recipe.get("loras")
    if loras is not None:
        ok = isinstance(loras, list) and all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("name", ""), str)
            and isinstance(e.get("scale", 1.0), (int, float)) and not isinstance(e.get("scale", 1.0), bool)
            for e in loras
        )  # fmt: skip
        if not ok:
            raise bad("a loras entry that is not a list of {name, path, scale} objects")


def call_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline arguments that remake the image described by ``params`` (an image's recipe)."""
    if params.get("prompt") is None:
        raise InvalidInputError("this image was made from prompt_embeds; its recipe cannot remake it")
    for key, hash_key in _INPUTS:
        names = params.get(key)
        if params.get(hash_key) and (not names or (isinstance(names, list) and not all(names))):
            raise InvalidInputError(f"this image's {key} was given as an image object, not a file; its recipe cannot remake it")
    return {k: params[k] for k in CALL_KEYS if k in params}


# input pictures a recipe names: (the call argument, the key of its pixel hash)
_INPUTS = (("image", "image_hash"), ("mask_image", "mask_hash"), ("control_image", "control_image_hash"),
           ("ip_image", "ip_image_hash"))  # fmt: skip


def remake_differences(recipe: dict[str, Any], pipe) -> list[str]:
    """Why remaking ``recipe`` on ``pipe`` may not give the original image bit for bit (empty: it will)."""
    reasons = []
    if recipe.get("model_hash") not in (None, pipe.weight_hash()):
        reasons.append(f"the weights differ (hash {pipe.weight_hash()}, recipe {recipe['model_hash']})")
    if recipe.get("device") not in (None, pipe.device.type):
        reasons.append(f"it was made on {recipe['device']}, this runs on {pipe.device.type}")
    if (recipe.get("batch_size") or 1) > 1:
        reasons.append(f"it was made in a batch of {recipe['batch_size']} and is remade alone (pixels may differ by 1 level)")
    for key, hash_key in _INPUTS:
        names, hashes = recipe.get(key), recipe.get(hash_key)
        names, hashes = (names, hashes) if isinstance(names, list) else ([names], [hashes])
        for name, expected in zip(names, hashes if isinstance(hashes, list) else []):
            if name and Path(name).is_file():
                from .images import image_hash, load_image

                if image_hash(load_image(name)) != expected:
                    reasons.append(f"the input {name} has changed since")
    if recipe.get("scheduler") is None and recipe.get("scheduler_class") not in (None, type(pipe.scheduler).__name__):
        reasons.append(f"it used {recipe['scheduler_class']}, the model's scheduler is {type(pipe.scheduler).__name__}")
    return reasons


def reapply_controls(pipe, recipe: dict[str, Any]) -> None:
    """Load the ControlNets / T2I-Adapters and the IP-Adapter a recipe used, from their recorded paths; an
    ``InvalidInputError`` saying why if one is missing or its weights have changed (the image cannot be
    remade without it)."""
    from ..models.hashing import file_sha256

    for entry in recipe.get("controls") or []:
        kind, path = entry.get("kind"), entry.get("path")
        what = {"controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter"}.get(kind)
        if what is None or not isinstance(path, str) or not Path(path).exists():
            raise InvalidInputError(f"the recipe used {what or 'a control'} {entry.get('name')!r} ({path}), which is "
                                    "missing; it cannot be remade without it (pass --controlnet PATH to choose one)")  # fmt: skip
        load = pipe.load_controlnet if kind == "controlnet" else pipe.load_t2i_adapter
        control = load(path, name=entry.get("name"))
        if control.weight_hash() != entry.get("weight_hash"):
            raise InvalidInputError(f"the {what} {path} has changed since the image was made (weight hash "
                                    f"{control.weight_hash()}, recipe {entry.get('weight_hash')}); it cannot be remade")  # fmt: skip
    ip = recipe.get("ip_adapter")
    if ip:
        path, encoder = ip.get("path"), ip.get("image_encoder")
        if not (isinstance(path, str) and Path(path).is_file() and isinstance(encoder, str) and Path(encoder).is_dir()):
            raise InvalidInputError(f"the recipe used the IP-Adapter {path} with image encoder {encoder}; one of them is "
                                    "missing, so it cannot be remade")  # fmt: skip
        if file_sha256(path) != ip.get("sha256"):
            raise InvalidInputError(f"the IP-Adapter {path} has changed since the image was made; it cannot be remade")
        pipe.load_ip_adapter(path, image_encoder=encoder)


def reapply_loras(pipe, recorded: list[dict[str, Any]]) -> list[str]:
    """Load the LoRAs a recipe lists (``params["loras"]``) whose files are still there unchanged, fused
    if they were; returns one line for each that is missing or changed (it is left out)."""
    from ..models.hashing import file_sha256

    problems = []
    for entry in recorded:
        path = entry.get("path")
        if not path or not Path(path).is_file() or file_sha256(path) != entry.get("sha256"):
            problems.append(f"the recipe used LoRA {entry.get('name')!r} ({path}), which is missing or "
                            "has changed; remaking without it (pass --lora to choose)")  # fmt: skip
            continue
        pipe.load_lora(path, scale=entry.get("scale", 1.0), name=entry.get("name"))
    if any(entry.get("fused") for entry in recorded):
        pipe.fuse_lora()
    return problems
