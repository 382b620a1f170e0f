"""The output folder of a batch run: PNGs, per-writer manifest and error parts merged at the end,
``run.json``, and the rules that keep runs from mixing.

Each PNG is written atomically (temporary name, then rename; a whole object on object storage) and
only then gets its manifest line, so a run killed at any moment leaves no truncated PNG and no
manifest line without its file. A folder that holds another run's images is refused (or, with
``--overwrite``, those images alone are deleted); images of this run that lost their manifest line
get it back from their recipe. ``out`` is a path, a URL, or a folder from ``storage.open_folder``.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from ..errors import InvalidInputError
from .rows import Item
from .storage import PartWriter, open_folder

_OUR_PNG = re.compile(r"^[A-Za-z0-9._-]+-\d+\.png$")  # ID-INDEX.png
_OUR_TMP = re.compile(r"^\.([A-Za-z0-9._-]+-\d+\.png|manifest\.jsonl|errors[.a-z0-9-]*\.jsonl|run\.json)\.[^/]+\.tmp$")
RUN_FILE, MANIFEST, ERRORS = "run.json", "manifest.jsonl", "errors.jsonl"


def lock_folder(out):
    """Main process: create ``out`` and lock it for this run (held until the returned handle is
    dropped), or refuse if another batch is writing there. Before any model is loaded."""
    out = open_folder(out)
    out.makedirs()
    return out.lock()


def check_folder(out, items: list[Item], run_info: dict, overwrite: bool) -> None:
    """Main process, before the model is loaded: refuse a folder that holds another run, as far as
    that can be told without the model (``run_info`` without its weight hash; rows that leave
    their size to the model are compared by everything else). Changes nothing."""
    if not overwrite:
        _foreign(open_folder(out), items, run_info, None, overwrite=False)


def prepare_folder(out, items: list[Item], run_info: dict, default_size: int, overwrite: bool) -> None:
    """Main process, with the folder locked: make ``out`` this run's folder, or refuse.

    Images from another run (other model, dtype, device, base seed or defaults; rows this
    prompts file does not have; a row whose values changed) are never mixed in: that is an
    error, or with ``overwrite`` those images (and nothing else) are deleted. Images of this run
    that lost their manifest line are given it back from their recipe.
    """
    out = open_folder(out)
    _clear_temporary(out)
    for name in out.names("errors.part-*.jsonl"):  # errors are found afresh by every run
        out.remove(name)
    previous = _read_run_file(out)
    foreign, unlisted = _foreign(out, items, run_info, default_size, overwrite, previous)
    for name in foreign:
        out.remove(name)
    restored = PartWriter(out, "restored")
    for item, recipe in unlisted:
        restored.add(manifest_line(item, recipe, None))
    restored.flush()
    threads = (None if foreign else (previous or {}).get("cpu_threads")), run_info.get("cpu_threads")
    if None not in threads and threads[0] != threads[1]:  # run.json keeps the count the run started with
        import warnings

        warnings.warn(f"{out} was started with {threads[0]} CPU threads and goes on with {threads[1]}: the images "
                      f"made from here on may differ in the last bits from a run with {threads[0]} "
                      f"(pass --threads {threads[0]} to match)", stacklevel=2)  # fmt: skip
        run_info = {**run_info, "cpu_threads": threads[0]}
    out.write(RUN_FILE, json.dumps(run_info, indent=2, sort_keys=True).encode())


def _clear_temporary(out) -> None:
    """Our temporary files in the locked folder: never complete, never listed (a killed writer's)."""
    for name in out.names(".*.tmp"):
        if _OUR_TMP.match(name):
            out.remove(name)


def _foreign(out, items: list[Item], run_info: dict, default_size: Optional[int], overwrite: bool, previous=None):
    """(names of images of another run, images of this run without a manifest line); without
    ``overwrite`` the first is an error. A key ``run_info`` lacks (the weight hash, before loading)
    is not compared. An image's recipe is read from its manifest line where it has one (the line
    is written from the same values, after the file), else from the PNG."""
    current = {it.file: it for it in items}
    previous = _read_run_file(out) if previous is None else previous  # (run.json as read by the caller)
    same_run = previous is None or _comparable(previous, run_info) == _comparable(run_info, run_info)
    foreign: list[str] = []  # images of another run
    unlisted: list[tuple[Item, dict]] = []
    recorded = _recorded(out)
    for name in out.names("*.png"):
        item = current.get(name)
        if item is None and not (_OUR_PNG.match(name) and (name in recorded or out.recipe(name))):
            continue  # not ours: leave it alone
        listed = recorded.get(name, {}).get("params")
        recipe = None if item is None else listed if isinstance(listed, dict) else out.recipe(name)
        if not same_run or item is None or not _made_from(recipe, item, default_size):
            foreign.append(name)
        elif name not in recorded:
            unlisted.append((item, recipe))
    if foreign and not overwrite:
        why = "another model, dtype, device, base seed or defaults" if not same_run else "rows this file does not have, or other values"
        raise InvalidInputError(
            f"{out} holds {len(foreign)} images of another run ({why}; e.g. {foreign[0]}); "
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


def _read_run_file(out) -> Optional[dict]:
    data = out.read_bytes(RUN_FILE)
    if data is None:
        return None
    try:
        info = json.loads(data.decode("utf-8"))
    except ValueError:
        info = None
    return info if isinstance(info, dict) else {"damaged": True}


def _comparable(run_info: dict, known: dict) -> dict:
    """What makes two runs the same run (the model by its weights, not where it lies), of what
    ``known`` has (before the model is loaded, all but the weight hash)."""
    keys = [k for k in ("model_hash", "dtype", "device", "base_seed", "defaults", "loras", "controlnets")
            if k in known or k in ("loras", "controlnets")]  # fmt: skip
    return json.loads(json.dumps({k: run_info.get(k) for k in keys}))


def merge(out, items: list[Item], errors: Optional[list[dict]] = None) -> None:
    """Join the per-writer parts into manifest.jsonl (file order) and errors.jsonl (the error parts,
    then ``errors``). An image of this run whose line was lost (its writer died between the file and
    the line, and the retry found the file made) gets its line from its recipe. Every writer is done
    by now, so a temporary file left is a dead writer's."""
    out = open_folder(out)
    _clear_temporary(out)
    recorded = _recorded(out)
    present = set(out.names("*.png"))
    lines = []
    for it in items:
        if it.file not in present:
            continue
        if it.file not in recorded:
            recipe = out.recipe(it.file)
            if recipe is None:
                continue
            recorded[it.file] = manifest_line(it, recipe, None)
        lines.append(recorded[it.file])
    out.write(MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines).encode())
    error_parts = out.names("errors.part-*.jsonl")
    found = [e for data in out.read_many(error_parts).values() for e in parse_jsonl(data)] + list(errors or [])
    out.write(ERRORS, "".join(json.dumps(e, sort_keys=True) + "\n" for e in found).encode())
    for name in [*out.names("manifest.part-*.jsonl"), *error_parts]:
        out.remove(name)


def manifest_line(item: Item, params: dict, seconds: Optional[float]) -> dict:
    return {"id": item.row.id, "index": item.index, "file": item.file, "seed": item.seed,
            "seconds": None if seconds is None else round(seconds, 4), "params": params}  # fmt: skip


def parse_jsonl(data: Optional[bytes]) -> list[dict]:
    """The JSON objects of a JSON-lines file's bytes (None: no file); a line cut short by a crash is dropped."""
    if data is None:
        return []
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_jsonl(out, name: str) -> list[dict]:
    return parse_jsonl(open_folder(out).read_bytes(name))


def _recorded(out) -> dict[str, dict]:
    """Manifest lines already written (merged manifest and every part), by file name."""
    lines = {}
    names = [MANIFEST, *out.names("manifest.part-*.jsonl")]
    found = out.read_many(names)
    for name in names:
        for record in parse_jsonl(found.get(name)):
            if isinstance(record.get("file"), str):
                lines[record["file"]] = record
    return lines
