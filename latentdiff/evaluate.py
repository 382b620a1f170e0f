"""``latentdiff eval``: how well a model follows its captions, measured on the built-in data sets.

- **shapes** (prompt adherence): one image per held-out caption of a ``shapes`` data set (a
  combination of colour, shape, position and background never seen in training); the four
  attributes are read back from the pixels procedurally (:func:`read_shape`) and compared
  with the caption: accuracy per attribute, and all four at once.
- **emoji** (caption retrieval): one image for each of K captions of an ``emoji`` data set; a hit
  when the caption's own training image is among the ``top`` (5) training images nearest to it,
  by pixel distance (32x32 thumbnails) or VAE-latent distance.
- Both at every guidance scale asked for and at 1.0 (no classifier-free guidance), so the
  table shows what guidance adds.
- **shapes with a ControlNet** (``controlnet=``, a data set made with ``--control``): each held-out
  caption drawn with its row's control image; besides the four attributes, *placed*: the drawn
  shape covers the control image's silhouette (intersection over union at least ``PLACED_IOU``).
- **LCM** (``lcm=True``): the default model with its LCM-LoRA, to set beside the teacher's figures.
- **VAE**: reconstruction PSNR (encode to the latent mean, decode) on the held-out ``test/``
  images of each data set (its ``train/`` images where it has no held-out split, and labelled so).

Everything is deterministic: prompt *i* gets seed ``seed + i``, captions and images are picked
by fixed strides, not at random.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .checks import check_float, positive_int
from .data.builders import read_dataset_info, read_split
from .data.builders.shapes import COLOURS, CONTROL_COLUMN, POSITIONS, SHAPES, draw_shape
from .errors import InvalidInputError, MissingFileError
from .fileio import atomic_write

ATTRIBUTES = ("colour", "shape", "position", "background")
PSNR_CAP_DB = 100.0  # identical images would give infinity, which JSON cannot hold
THUMB = 32  # pixel-space retrieval compares 32x32 thumbnails: robust to one-pixel shifts and noise
TEMPLATE = 24  # shape masks are compared at 24x24
PLACED_IOU = 0.5  # a shape is "placed" when it overlaps the control image's silhouette at least this much


@dataclass
class EvalConfig:
    """What ``latentdiff eval`` measures and how (the CLI fills it from its options)."""

    data: list[Path]
    model: Optional[str] = None  # a diffusers-format folder; None = the embedded default model
    guidance: tuple[float, ...] = (7.5,)  # 1.0 is always added
    steps: int = 25
    scheduler: Optional[str] = None  # None = the model's own
    prompts: int = 64  # held-out shapes captions (0 = all)
    captions: int = 50  # emoji captions K (0 = all)
    top: int = 5
    space: str = "pixel"  # emoji retrieval distance: "pixel" or "latent"
    psnr_images: int = 64  # images per data set for the VAE figure (0 = all)
    seed: int = 0
    batch_size: int = 16
    device: Optional[str] = None
    progress: bool = False
    lcm: bool = False  # the default model with its LCM-LoRA (set steps 4, scheduler "lcm", guidance (1.0,))
    controlnet: Optional[str] = None  # a ControlNet (folder, file or "default"): shapes drawn with their control images
    control_scale: float = 1.0

    def check(self) -> None:
        if not self.data:
            raise InvalidInputError("give at least one data set: --data DIR (made by 'latentdiff data shapes DIR')")
        for name in ("steps", "top", "batch_size"):
            positive_int(getattr(self, name), f"--{name.replace('_', '-')}")
        for name in ("prompts", "captions", "psnr_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be 0 (all) or more, got {value!r}")
        for g in self.guidance:
            check_float(g, "--guidance", 0.0, None, "1 means no classifier-free guidance")
        if self.space not in ("pixel", "latent"):
            raise InvalidInputError(f"--space must be pixel or latent, got {self.space!r}")
        check_float(self.control_scale, "--control-scale", 0.0, 10.0, "1 is usual")
        if self.lcm and self.model is not None:
            raise InvalidInputError("--lcm evaluates the default model with its LCM-LoRA; drop the model folder")


# -- reading attributes back from pixels --------------------------------------------------------

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)
_COLOUR_NAMES = list(COLOURS)


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB values 0..255 -> (...) index of the nearest palette colour (Euclidean in RGB)."""
    d = ((pixels[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)  # (..., 8)
    return d.argmin(-1)


def _templates() -> dict[str, np.ndarray]:
    """Each shape's mask drawn large, cropped to its bounding box, resized to TEMPLATE^2."""
    from PIL import Image, ImageDraw

    out = {}
    for shape in SHAPES:
        canvas = Image.new("L", (256, 256), 0)
        draw_shape(ImageDraw.Draw(canvas), shape, 128, 128, 100, 255)
        out[shape] = _normalise_mask(np.asarray(canvas) > 127)
    return out


def _normalise_mask(mask: np.ndarray) -> np.ndarray:
    """Crop a boolean mask to its bounding box and resize it to TEMPLATE x TEMPLATE (float 0..1)."""
    from PIL import Image

    rows, cols = np.nonzero(mask)
    crop = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    image = Image.fromarray(crop.astype(np.uint8) * 255).resize((TEMPLATE, TEMPLATE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255


_TEMPLATE_CACHE: dict[str, np.ndarray] = {}


def read_shape(image) -> dict[str, Optional[str]]:
    """Colour, shape, position and background of a picture like those of the shapes data set.

    Every pixel is labelled with its nearest palette colour. The background is the commonest
    label on the border; the shape is the largest connected region of one other label, which
    gives the colour (scattered noise never forms a large region); the region's centroid gives the position (the 3x3 grid cell
    it falls in) and its outline, scaled to a fixed size, the shape (highest IoU with each shape's
    template). Attributes that cannot be read (a plain image) are None.
    """
    background, colour, mask = shape_region(image)
    h, w = mask.shape
    result: dict[str, Optional[str]] = {a: None for a in ATTRIBUTES}
    result["background"] = _COLOUR_NAMES[background]
    if colour is None:
        return result
    result["colour"] = _COLOUR_NAMES[colour]
    rows, cols = np.nonzero(mask)
    cell = (min(int(cols.mean() * 3 / w), 2), min(int(rows.mean() * 3 / h), 2))
    result["position"] = next(name for name, (c, r, _) in POSITIONS.items() if (c, r) == cell)
    if not _TEMPLATE_CACHE:
        _TEMPLATE_CACHE.update(_templates())
    outline = _normalise_mask(mask)
    iou = {s: np.minimum(outline, t).sum() / np.maximum(outline, t).sum() for s, t in _TEMPLATE_CACHE.items()}
    result["shape"] = max(iou, key=iou.get)
    return result


def shape_region(image) -> tuple[int, Optional[int], np.ndarray]:
    """(background, colour, mask) of a shapes-like picture, as :func:`read_shape` reads them: palette
    indices of the commonest border label and of the label with the largest connected region
    (None, and an empty mask, when fewer than 4 pixels differ from the background), and that
    region as an (H, W) boolean mask."""
    from scipy import ndimage

    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)  # (H, W, 3)
    labels = nearest_colours(pixels)  # (H, W)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(_PALETTE)).argmax())
    others = labels[labels != background]
    if others.size < 4:
        return background, None, np.zeros(labels.shape, dtype=bool)
    best = 0
    for candidate in np.unique(others):  # the colour with the largest connected region: noise is scattered
        regions, _ = ndimage.label(labels == candidate)
        sizes = np.bincount(regions.ravel())[1:]  # pixels per region
        if sizes.max() > best:
            best, colour, mask = sizes.max(), int(candidate), regions == (1 + int(sizes.argmax()))
    return background, colour, mask


def placed_fraction(images: Sequence, controls: Sequence) -> float:
    """Fraction of images whose shape (:func:`shape_region`) overlaps the white silhouette of its
    control image with intersection over union at least ``PLACED_IOU``."""
    if not images:
        raise InvalidInputError("no images to score")
    hits = 0
    for image, control in zip(images, controls, strict=True):
        mask = shape_region(image)[2]
        target = np.asarray(control.convert("L").resize(mask.shape[::-1])) > 127
        union = (mask | target).sum()
        hits += bool(union) and (mask & target).sum() / union >= PLACED_IOU
    return hits / len(images)


def attribute_accuracy(images: Sequence, truths: Sequence[dict[str, str]]) -> dict[str, float]:
    """Fraction of images whose read-back attribute equals the caption's, per attribute and for all four."""
    if not images:
        raise InvalidInputError("no images to score")
    hits = {a: 0 for a in (*ATTRIBUTES, "all")}
    for image, truth in zip(images, truths, strict=True):
        seen = read_shape(image)
        right = [seen[a] == truth[a] for a in ATTRIBUTES]
        for a, ok in zip(ATTRIBUTES, right):
            hits[a] += ok
        hits["all"] += all(right)
    return {a: n / len(images) for a, n in hits.items()}


# -- retrieval and PSNR ----------------------------------------------------------------------------


def retrieval_hits(queries: np.ndarray, gallery: np.ndarray, targets: Sequence[int], top: int) -> np.ndarray:
    """(Q,) booleans: is ``gallery[targets[q]]`` among the ``top`` gallery rows nearest to ``queries[q]``?

    queries (Q, D), gallery (G, D): squared Euclidean distance. Ties count against the query
    (a row exactly as near as the target counts as nearer, so a constant gallery scores no hits).
    """
    q = torch.as_tensor(np.asarray(queries, dtype=np.float64))
    g = torch.as_tensor(np.asarray(gallery, dtype=np.float64))
    d = torch.cdist(q, g) ** 2  # (Q, G)
    own = d[torch.arange(len(q)), torch.as_tensor(list(targets))]  # (Q,)
    # rank = rows strictly nearer + rows equally near (other than the target itself)
    rank = (d < own[:, None]).sum(1) + (d == own[:, None]).sum(1) - 1
    return (rank < top).numpy()


def thumbnails(images: Sequence) -> np.ndarray:
    """PIL images -> (N, 3*THUMB*THUMB) floats in [0, 1]: box-filtered thumbnails for pixel retrieval."""
    from PIL import Image

    rows = [
        np.asarray(im.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.float32) / 255
        for im in images
    ]
    return np.stack(rows).reshape(len(rows), -1)


def psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of (N, ...) arrays with values in [0, 1]: 10 log10(1 / MSE), capped at 100."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise InvalidInputError(f"PSNR needs equal shapes, got {ref.shape} and {out.shape}")
    mse = ((ref - out) ** 2).reshape(len(ref), -1).mean(1)
    return np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-300)), PSNR_CAP_DB)


def _to_tensor(images: Sequence, device, dtype) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])  # (N, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).to(device, dtype) * 2 - 1


@torch.no_grad()
def vae_latents(vae, images: Sequence, batch_size: int = 16) -> torch.Tensor:
    """(N, C, H/f, W/f) latent means (the posterior's mode, no sampling) of PIL images."""
    out = []
    for i in range(0, len(images), batch_size):
        x = _to_tensor(images[i : i + batch_size], vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.mode().float().cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae, images: Sequence, batch_size: int = 16) -> np.ndarray:
    """Per-image PSNR of each image against its VAE round trip (latent mean, decoded, clamped)."""
    scores = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = _to_tensor(chunk, vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        scores.append(psnr(((x + 1) / 2).float().cpu().numpy(), ((y + 1) / 2).float().cpu().numpy()))
    return np.concatenate(scores)


# -- the whole evaluation -----------------------------------------------------------------------


def _stride(rows: list, n: int) -> list:
    """``n`` rows spread evenly over ``rows`` (all of them if n is 0 or too large): deterministic, no RNG."""
    if n == 0 or n >= len(rows):
        return list(rows)
    return [rows[i * len(rows) // n] for i in range(n)]


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _generate(pipe, captions: list[str], config: EvalConfig, guidance: float, size: int, controls=None) -> list:
    images = []
    for i in range(0, len(captions), config.batch_size):
        chunk = captions[i : i + config.batch_size]
        control = {} if controls is None else {"control_image": controls[i : i + config.batch_size],
                                               "control_scale": config.control_scale}  # fmt: skip
        result = pipe(
            chunk,
            **control,
            num_inference_steps=config.steps,
            guidance_scale=guidance,
            scheduler=config.scheduler,
            seed=[config.seed + i + j for j in range(len(chunk))],
            height=size,
            width=size,
            progress=config.progress,
        )
        images.extend(result.images)
    return images


def _guidances(config: EvalConfig) -> list[float]:
    if config.lcm:  # the LCM-LoRA has its guidance built in: a guidance pass on top is not what it is for
        return [1.0]
    return sorted({1.0, *(float(g) for g in config.guidance)})


def evaluate(config: EvalConfig, pipe=None) -> dict[str, Any]:
    """Run every measurement the data sets allow; returns the report (what ``--json`` writes)."""
    config.check()
    kinds: dict[str, Path] = {}
    for folder in config.data:
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(
                f"data set folder {folder} does not exist; make it with 'latentdiff data shapes {folder}'"
            )
        kind = read_dataset_info(folder).get("builder")
        if kind not in ("shapes", "emoji"):
            raise InvalidInputError(f"{folder} is a {kind!r} data set; eval knows shapes and emoji")
        if kind in kinds:
            raise InvalidInputError(f"two {kind} data sets given ({kinds[kind]}, {folder}); give one of each kind")
        kinds[kind] = folder
    if config.controlnet is not None:
        if "emoji" in kinds:
            raise InvalidInputError("--controlnet is measured on a shapes data set made with --control; "
                                    "drop the emoji data set")  # fmt: skip
        if "shapes" in kinds and CONTROL_COLUMN not in (read_split(kinds["shapes"], "test") or [{}])[0]:
            raise InvalidInputError(f"{kinds['shapes']} has no control images; make it with "
                                    f"'latentdiff data shapes {kinds['shapes']} --control silhouette'")  # fmt: skip
    if pipe is None:
        from .generation.pipeline import LatentDiffusion

        pipe = LatentDiffusion.from_pretrained(config.model, lcm=config.lcm)
        if config.device:
            pipe.to(config.device)
    control = pipe.load_controlnet(config.controlnet) if config.controlnet is not None else None
    report: dict[str, Any] = {
        "model": {"source": pipe.source, "weight_hash": pipe.weight_hash()},
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(config).items()
            if k not in ("progress", "data", "model", "device")
        },
        "guidance": _guidances(config),
    }
    if control is not None:
        report["model"]["controlnet"] = {"source": str(config.controlnet), "weight_hash": control.weight_hash()}
    report["settings"]["data"] = [str(p) for p in config.data]
    if "shapes" in kinds:
        report["shapes"] = _shapes(pipe, kinds["shapes"], config)
    if "emoji" in kinds:
        report["emoji"] = _emoji(pipe, kinds["emoji"], config)
    report["vae"] = {kind: _vae(pipe, folder, config) for kind, folder in kinds.items()}
    return report


def _shapes(pipe, folder: Path, config: EvalConfig) -> dict[str, Any]:
    rows = read_split(folder, "test")
    if not rows:
        raise InvalidInputError(
            f"{folder} has no test/ split of held-out shapes; make it again with 'latentdiff data shapes'"
        )
    rows = _stride(rows, config.prompts)
    size = _open(rows[0]["path"]).width
    truths = [{a: row[a] for a in ATTRIBUTES} for row in rows]
    controls = None
    if config.controlnet is not None:
        controls = [_open(row["path"].parent / row[CONTROL_COLUMN]) for row in rows]
    results = {}
    for g in _guidances(config):
        images = _generate(pipe, [row["text"] for row in rows], config, g, size, controls)
        results[str(g)] = attribute_accuracy(images, truths)
        if controls is not None:
            results[str(g)]["placed"] = placed_fraction(images, controls)
    return {"data": str(folder), "split": "test", "prompts": len(rows), "size": size, "accuracy": results}


def _emoji(pipe, folder: Path, config: EvalConfig) -> dict[str, Any]:
    gallery_rows = read_split(folder, "train")
    if not gallery_rows:
        raise InvalidInputError(f"{folder} has no train/ images; make it again with 'latentdiff data emoji'")
    gallery_images = [_open(row["path"]) for row in gallery_rows]
    picked = _stride(list(range(len(gallery_rows))), config.captions)
    size = gallery_images[0].width

    def features(images):
        if config.space == "pixel":
            return thumbnails(images)
        return vae_latents(pipe.vae, images, config.batch_size).reshape(len(images), -1).numpy()

    gallery = features(gallery_images)
    results = {}
    for g in _guidances(config):
        images = _generate(pipe, [gallery_rows[i]["text"] for i in picked], config, g, size)
        queries = features(images)
        results[str(g)] = {
            f"top{config.top}": float(retrieval_hits(queries, gallery, picked, config.top).mean()),
            "top1": float(retrieval_hits(queries, gallery, picked, 1).mean()),
        }
    return {
        "data": str(folder),
        "captions": len(picked),
        "gallery": len(gallery_rows),
        "space": config.space,
        "chance_top": config.top / len(gallery_rows),
        "retrieval": results,
    }


def _vae(pipe, folder: Path, config: EvalConfig) -> dict[str, Any]:
    split = "test"
    rows = read_split(folder, split)
    if not rows:  # no held-out images in this data set: say so rather than call training images held out
        split = "train"
        rows = read_split(folder, split)
    rows = _stride(rows, config.psnr_images)
    scores = reconstruction_psnr(pipe.vae, [_open(r["path"]) for r in rows], config.batch_size)
    return {"data": str(folder), "split": split, "held_out": split == "test", "images": len(rows),
            "psnr_db": float(scores.mean()), "psnr_db_min": float(scores.min())}  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table: one row per figure, one column per guidance scale."""
    guidances = report["guidance"]
    source = report["model"]["source"]
    name = source.get("path") or f"preset {source.get('preset')}"
    s = report["settings"]
    scheduler = s["scheduler"] or "the model's own"
    extras = "".join(
        [" + its LCM-LoRA" if s.get("lcm") else "",
         f" + ControlNet {s['controlnet']} at scale {s['control_scale']:g}" if s.get("controlnet") else ""]
    )  # fmt: skip
    lines = [
        f"model: {name}{extras} (weights {report['model']['weight_hash']}); {s['steps']} steps, scheduler {scheduler}, seed {s['seed']}",
        f"{'':<44}" + "".join(f"{'guidance ' + format(g, 'g'):>14}" for g in guidances),
    ]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<44}" + "".join(f"{v:>14}" for v in values))

    if "shapes" in report:
        sh = report["shapes"]
        placed = ("placed",) if "placed" in sh["accuracy"][str(guidances[0])] else ()
        for a in (*ATTRIBUTES, "all", *placed):
            what = {"all": "all four", "placed": f"placed (IoU >= {PLACED_IOU:g})"}.get(a, a)
            label = f"shapes {what} ({sh['prompts']} held-out)"
            row(label, [f"{100 * sh['accuracy'][str(g)][a]:.1f} %" for g in guidances])
    if "emoji" in report:
        em = report["emoji"]
        for key in em["retrieval"][str(guidances[0])]:
            label = f"emoji {key.replace('top', 'top-')} retrieval ({em['captions']} of {em['gallery']}, {em['space']})"
            row(label, [f"{100 * em['retrieval'][str(g)][key]:.1f} %" for g in guidances])
    for kind, v in report.get("vae", {}).items():
        where = "held-out" if v["held_out"] else "training"
        row(
            f"VAE PSNR, {kind} ({v['images']} {where} images)", [f"{v['psnr_db']:.2f} dB"] + [""] * (len(guidances) - 1)
        )
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise MissingFileError(f"folder {path.parent} does not exist; create it or choose another --json path")
    with atomic_write(path, "w") as f:
        f.write(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path


__all__ = [
    "ATTRIBUTES",
    "EvalConfig",
    "attribute_accuracy",
    "evaluate",
    "format_table",
    "nearest_colours",
    "placed_fraction",
    "psnr",
    "read_shape",
    "reconstruction_psnr",
    "retrieval_hits",
    "shape_region",
    "thumbnails",
    "vae_latents",
    "write_report",
]
