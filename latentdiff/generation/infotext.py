"""A1111 "infotext": the ``parameters`` PNG text chunk that the A1111 web UI, ComfyUI, civitai and
image browsers read to show how an image was made.

Its documented format (A1111's "PNG Info"), which :func:`format_infotext` writes and
:func:`parse_infotext` reads:

    the prompt (any number of lines)
    Negative prompt: the negative prompt (any number of lines; the line is left out when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, Model: name

The last line holds ``Key: value`` pairs separated by commas; it counts as the parameter line
only if it holds at least three of them (else it is part of the prompt). A value that contains a
comma, a colon or a newline is written as a JSON string. ``Size: WxH`` gives width and height.

:func:`infotext_call` turns the fields into pipeline arguments, and lists what it cannot map.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from ..errors import InvalidInputError
from .samplers import from_a1111, to_a1111

PNG_KEY = "parameters"
# one "Key: value" pair: a key of word characters, spaces, '-' and '/', a value up to the next
# comma, or a JSON string with escapes
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(x: Any) -> str:
    """A number as A1111 writes it (7, 7.5); anything else (a recipe edited by hand) as its text."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def model_name(source: Any) -> str:
    """A short model name for the infotext: the folder's or file's name, or the preset."""
    if isinstance(source, dict):
        if isinstance(source.get("path"), str) and source["path"]:
            return Path(source["path"]).name.removesuffix(".safetensors").removesuffix(".ckpt")
        if source.get("preset"):
            return f"preset-{source['preset']}"
    return "unknown"


def format_infotext(params: dict[str, Any]) -> str:
    """The A1111 infotext of one image's recipe (``params`` as ``image_params`` makes it)."""
    names = (params.get("scheduler"), params.get("scheduler_class"))
    known = any(n is not None for n in names) and all(n is None or isinstance(n, str) for n in names)
    sampler, schedule = to_a1111(params.get("scheduler"), params.get("scheduler_class")) if known else (None, None)
    size = (params.get("width"), params.get("height"))
    fields: dict[str, Any] = {  # (a recipe written by hand may lack some: those are left out)
        "Steps": params.get("num_inference_steps"),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": None if params.get("guidance_scale") is None else _number(params["guidance_scale"]),
        "Seed": params.get("seed"),
        "Size": f"{size[0]}x{size[1]}" if None not in size else None,
        "Model hash": (params.get("model_hash") or "")[:10] or None,
        "Model": model_name(params.get("model")) if params.get("model") else None,
    }
    if params.get("strength") is not None:
        fields["Denoising strength"] = _number(params["strength"])
    if isinstance(params.get("clip_skip"), int) and params["clip_skip"]:  # A1111 counts the last layer as 1:
        fields["Clip skip"] = params["clip_skip"] + 1  # our clip_skip=1 is its "Clip skip: 2"
    if params.get("eta"):
        fields["Eta"] = _number(params["eta"])
    if params.get("guidance_rescale"):
        fields["CFG rescale"] = _number(params["guidance_rescale"])
    if params.get("hires_scale") is not None:
        fields["Hires upscale"] = _number(params["hires_scale"])
        fields["Hires upscaler"] = "Latent" if params.get("hires_upscale") == "latent" else "Lanczos"
        if params.get("hires_strength") is not None:
            fields["Denoising strength"] = _number(params["hires_strength"])
    if params.get("latentdiff_version"):
        fields["Version"] = f"latentdiff {params['latentdiff_version']}"
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    negative = params.get("negative_prompt") or ""
    prompt = params.get("prompt") or ""
    return f"{prompt}\n{_NEGATIVE} {negative}\n{line}" if negative else f"{prompt}\n{line}"


def parse_infotext(text: str) -> dict[str, str]:
    """The fields of an infotext: ``Prompt``, ``Negative prompt`` and every ``Key`` of the last
    line as text (``Size`` as ``Size-1`` (width) and ``Size-2`` (height))."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # not a parameter line: part of the prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if m := _SIZE.match(value):
            fields[f"{key}-1"], fields[f"{key}-2"] = m.group(1), m.group(2)
        else:
            fields[key] = value
    return fields


# fields that say nothing about the pixels, or that infotext_call maps
_MAPPED = {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1",
           "Size-2", "Clip skip", "Eta", "CFG rescale", "Hires upscale", "Hires upscaler", "Denoising strength",
           "Model", "Model hash", "Version"}  # fmt: skip
_HARMLESS = {"Version", "User", "TI hashes", "Lora hashes", "Emphasis", "Pad conds", "Downcast alphas_cumprod"}


def infotext_call(fields: dict[str, str]) -> tuple[dict[str, Any], list[str], Optional[str]]:
    """Pipeline arguments from infotext ``fields``, the notes on what could not be mapped, and the
    sampler problem (None when the sampler maps; else a message, for a caller that can choose one).
    """
    notes: list[str] = []
    call: dict[str, Any] = {"prompt": fields.get("Prompt", ""), "negative_prompt": fields.get("Negative prompt") or None}

    def number(key: str, kind):
        try:
            return kind(float(fields[key])) if kind is int and float(fields[key]).is_integer() else kind(fields[key])
        except (KeyError, ValueError):
            raise InvalidInputError(f"the infotext's {key!r} is {fields.get(key)!r}, not a number") from None

    for key, arg, kind in (("Steps", "num_inference_steps", int), ("CFG scale", "guidance_scale", float),
                           ("Seed", "seed", int), ("Size-1", "width", int), ("Size-2", "height", int),
                           ("Eta", "eta", float), ("CFG rescale", "guidance_rescale", float)):  # fmt: skip
        if key in fields:
            call[arg] = number(key, kind)
    if "Clip skip" in fields and number("Clip skip", int) > 1:
        call["clip_skip"] = number("Clip skip", int) - 1
    problem = None
    if "Sampler" in fields:
        try:
            call["scheduler"] = from_a1111(fields["Sampler"], fields.get("Schedule type"))
        except InvalidInputError as e:
            problem = str(e)
    if "Hires upscale" in fields:
        call["hires_scale"] = number("Hires upscale", float)
        upscaler = fields.get("Hires upscaler", "Latent")
        call["hires_upscale"] = "latent" if upscaler.lower().startswith("latent") else "pixel"
        if call["hires_upscale"] == "pixel" and upscaler.lower() != "lanczos":
            notes.append(f"Hires upscaler {upscaler!r} is not available: upscaling with Lanczos")
        if "Denoising strength" in fields:
            call["hires_strength"] = number("Denoising strength", float)
        if fields.get("Hires steps", "0") not in ("0", ""):
            notes.append(f"Hires steps: {fields['Hires steps']} is not mapped: the hires pass runs its share of Steps")
    elif "Denoising strength" in fields:
        notes.append("the image was made from an input image (Denoising strength), which the PNG does not hold: "
                     "remade from noise; pass --image and --strength to start from a picture")  # fmt: skip
    if "Model" in fields or "Model hash" in fields:
        notes.append(f"made with model {fields.get('Model', '?')!r} (hash {fields.get('Model hash', '?')}); "
                     "remade with the model given here")  # fmt: skip
    other = [k for k in fields if k not in _MAPPED and k not in _HARMLESS]
    if other:
        notes.append("not mapped (ignored): " + ", ".join(f"{k}: {fields[k]}" for k in other))
    return call, notes, problem
