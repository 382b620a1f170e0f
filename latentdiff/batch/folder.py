"""The output folder of a batch run: PNGs, per-process manifest and error parts merged at the end,
``run.json``, and the rules that keep runs from mixing.

Each PNG is written atomically (temporary name, then rename) and only then gets its manifest line,
so a run killed at any moment leaves no truncated PNG and no manifest line without its file. A
folder that holds another run's images is refused (or, with ``--overwrite``, those images alone
are deleted); images of this run that lost their manifest line get it back from their recipe.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from ..errors import InvalidInputError, LatentDiffusionError
from ..fileio import atomic_write
from .rows import Item

_OUR_PNG = re.compile(r"^[A-Za-z0-9._-]+-\d+\.png$")  # ID-INDEX.png
_OUR_TMP = re.compile(r"^\.([A-Za-z0-9._-]+-\d+\.png|manifest\.jsonl|errors[.a-z0-9-]*\.jsonl|run\.json)\.[^/]+\.tmp$")
RUN_FILE, MANIFEST, ERRORS = "run.json", "manifest.jsonl", "errors.jsonl"


def lock_folder(out: Path):
    """Main process: create ``out`` and lock it for this run (held until the returned handle is
    dropped), or refuse if another batch is writing there. Before any model is loaded."""
    out.mkdir(parents=True, exist_ok=True)
    return _lock(out)


def check_folder(out: Path, items: list[Item], run_info: dict, overwrite: bool) -> None:
    """Main process, before the model is loaded: refuse a folder that holds another run, as far as
    that can be told without the model (``run_info`` without its weight hash; rows that leave
    their size to the model are compared by everything else). Changes nothing."""
    if not overwrite:
        _foreign(out, items, run_info, None, overwrite=False)


def prepare_folder(out: Path, items: list[Item], run_info: dict, default_size: int, overwrite: bool) -> None:
    """Main process, with the folder locked: make ``out`` this run's folder, or refuse.

    Images from another run (other model, dtype, device, base seed or defaults; rows this
    prompts file does not have; a row whose values changed) are never mixed in: that is an
    error, or with ``overwrite`` those images (and nothing else) are deleted. Images of this run
    that lost their manifest line are given it back from their recipe.
    """
    for stale in out.iterdir():  # temporary files of a killed run: never complete, never listed
        if _OUR_TMP.match(stale.name):
            stale.unlink(missing_ok=True)
    for part in out.glob("errors.part-*.jsonl"):  # errors are found afresh by every run
        part.unlink()
    foreign, unlisted = _foreign(out, items, run_info, default_size, overwrite)
    for path in foreign:
        path.unlink()
    for item, recipe in unlisted:
        append_line(out / "manifest.part-0.jsonl", manifest_line(item, recipe, None))
    with atomic_write(out / RUN_FILE, "w") as f:
        json.dump(run_info, f, indent=2, sort_keys=True)


def _foreign(out: Path, items: list[Item], run_info: dict, default_size: Optional[int], overwrite: bool):
    """(images of another run, images of this run without a manifest line); without ``overwrite``
    the first is an error. A key ``run_info`` lacks (the weight hash, before loading) is not compared."""
    current = {it.file: it for it in items}
    previous = _read_run_file(out)
    same_run = previous is None or _comparable(previous, run_info) == _comparable(run_info, run_info)
    foreign: list[Path] = []  # images of another run
    unlisted: list[tuple[Item, dict]] = []
    recorded = _recorded(out)
    for path in sorted(out.glob("*.png")):
        item = current.get(path.name)
        if item is None and not (_OUR_PNG.match(path.name) and (path.name in recorded or _recipe_or_none(path))):
            continue  # not ours: leave it alone
        recipe = _recipe_or_none(path) if item is not None else None
        if not same_run or item is None or not _made_from(recipe, item, default_size):
            foreign.append(path)
        elif path.name not in recorded:
            unlisted.append((item, recipe))
    if foreign and not overwrite:
        why = "another model, dtype, device, base seed or defaults" if not same_run else "rows this file does not have, or other values"
        raise InvalidInputError(
            f"{out} holds {len(foreign)} images of another run ({why}; e.g. {foreign[0].name}); "
            "use another --out folder, or --overwrite to replace them"
        )
    return foreign, unlisted


def _made_from(recipe: Optional[dict], item: Item, default_size: Optional[int]) -> bool:
    """Whether a finished image's recipe is what ``item`` asks for (a size left to the model is not
    compared when ``default_size`` is None: the model is not loaded yet)."""
    if recipe is None:
        return False
    row = item.row
    expected = {
        "prompt": row.prompt, "negative_prompt": row.negative_prompt, "seed": item.seed,
        "num_inference_steps": row.steps, "guidance_scale": row.guidance, "scheduler": row.scheduler,
        "width": row.width or default_size, "height": row.height or default_size,
        "control_image": list(row.control_image) or None,
    }  # fmt: skip
    return all(recipe.get(k) == v for k, v in expected.items() if v is not None or k in ("scheduler", "control_image"))


def _read_run_file(out: Path) -> Optional[dict]:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"damaged": True}


def _comparable(run_info: dict, known: dict) -> dict:
    """What makes two runs the same run (the model by its weights, not where it lies), of what
    ``known`` has (before the model is loaded, all but the weight hash)."""
    keys = [k for k in ("model_hash", "dtype", "device", "base_seed", "defaults", "loras", "controlnets")
            if k in known or k in ("loras", "controlnets")]  # fmt: skip
    return json.loads(json.dumps({k: run_info.get(k) for k in keys}))


def merge(out: Path, items: list[Item]) -> None:
    """Join the per-process parts into manifest.jsonl (file order) and errors.jsonl."""
    recorded = _recorded(out)
    lines = [recorded[it.file] for it in items if it.file in recorded and (out / it.file).exists()]
    with atomic_write(out / MANIFEST, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in lines)
    errors = [e for path in sorted(out.glob("errors.part-*.jsonl")) for e in read_jsonl(path)]
    with atomic_write(out / ERRORS, "w") as f:
        f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in errors)
    for path in [*out.glob("manifest.part-*.jsonl"), *out.glob("errors.part-*.jsonl")]:
        path.unlink()


def _lock(out: Path):
    """An exclusive lock on the folder for this run: two runs never write into one folder."""
    handle = open(out / ".latentdiff-batch.lock", "w")  # noqa: SIM115 - held until the run ends
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise InvalidInputError(f"another latentdiff batch is writing into {out}; wait for it or use another --out") from None
    return handle


def manifest_line(item: Item, params: dict, seconds: Optional[float]) -> dict:
    return {"id": item.row.id, "index": item.index, "file": item.file, "seed": item.seed,
            "seconds": None if seconds is None else round(seconds, 4), "params": params}  # fmt: skip


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line durably. A line cut short by a crash is closed off first, so it
    costs only itself (it is dropped when read; resume restores it from the PNG's recipe)."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _recorded(out: Path) -> dict[str, dict]:
    """Manifest lines already written (merged manifest and every part), by file name."""
    lines = {}
    for path in [out / MANIFEST, *sorted(out.glob("manifest.part-*.jsonl"))]:
        for record in read_jsonl(path):
            if isinstance(record.get("file"), str):
                lines[record["file"]] = record
    return lines


def _recipe_or_none(path: Path) -> Optional[dict]:
    from ..generation.recipe import read_recipe

    try:
        return read_recipe(path)
    except LatentDiffusionError:
        return None
