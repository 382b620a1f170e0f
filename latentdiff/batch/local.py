"""Scripted batch inference: a prompts file in, a folder of PNGs plus a manifest out.

One code path for ``latentdiff batch`` and ``accelerate launch inference/batch.py``:

1. read the prompts file (.txt / .jsonl / .csv) into rows; rows that cannot be read become
   errors, and the run goes on without them;
2. expand rows into images (*items*), each with a seed that depends only on the row (its own
   ``seed`` + image index, else a hash of the base seed, the row id and the index), so the images
   are the same whatever the batch size, the number of processes or which process makes them;
3. split the items across processes (item k goes to rank k mod world size), skip those whose PNG
   already exists (resume), batch compatible requests and generate;
4. write each PNG atomically (temporary name, then rename) and only then append its manifest line,
   so a run killed at any moment leaves no truncated PNG and no manifest line without its file;
5. merge the per-process manifest and error parts into ``manifest.jsonl`` / ``errors.jsonl``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable, Optional

from ..checks import whole_number
from ..errors import InvalidInputError, LatentDiffusionError, MissingFileError
from ..fileio import atomic_write

MAX_IMAGES_PER_ROW, MAX_STEPS, MAX_SIDE = 10_000, 10_000, 16_384
_OUR_PNG = re.compile(r"^[A-Za-z0-9._-]+-\d+\.png$")  # ID-INDEX.png
_OUR_TMP = re.compile(r"^\.([A-Za-z0-9._-]+-\d+\.png|manifest\.jsonl|errors[.a-z0-9-]*\.jsonl|run\.json)\.[^/]+\.tmp$")
ROW_KEYS = ("prompt", "negative_prompt", "seed", "n", "steps", "guidance", "width", "height", "scheduler", "id")
RUN_FILE, MANIFEST, ERRORS = "run.json", "manifest.jsonl", "errors.jsonl"


@dataclass(frozen=True)
class Defaults:
    """Values for the columns a row leaves out (the CLI options)."""

    negative_prompt: str = ""
    n: int = 1
    steps: int = 50
    guidance: float = 7.5
    width: Optional[int] = None  # None: the model's own size
    height: Optional[int] = None
    scheduler: Optional[str] = None  # None: the model's own scheduler


@dataclass
class BatchConfig:
    prompts: Path
    out: Path
    model: Optional[str] = None
    preset: Optional[str] = None
    preset_seed: int = 0
    batch_size: int = 4
    base_seed: int = 0
    device: Optional[str] = None
    dtype: str = "float32"
    overwrite: bool = False
    progress: bool = True
    defaults: Defaults = field(default_factory=Defaults)
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, scale), applied after loading
    fast: bool = False  # pipe.optimize(dtype=dtype) after the LoRAs: channels_last, fused QKV, torch.compile


@dataclass(frozen=True)
class Row:
    id: str
    line: int  # line number in the prompts file, for error reports
    prompt: str
    negative_prompt: str
    seed: Optional[int]
    n: int
    steps: int
    guidance: float
    width: Optional[int]
    height: Optional[int]
    scheduler: Optional[str]


@dataclass(frozen=True)
class Item:
    """One image to make: image ``index`` of ``row``."""

    row: Row
    index: int
    seed: int

    @property
    def file(self) -> str:
        return f"{_safe(self.row.id)}-{self.index}.png"

    def request(self) -> dict[str, Any]:
        """The pipeline arguments shared with the other images it may be batched with."""
        r = self.row
        return {
            "num_inference_steps": r.steps,
            "guidance_scale": r.guidance,
            "width": r.width,
            "height": r.height,
            "scheduler": r.scheduler,
        }


@dataclass
class RowError:
    id: Optional[str]
    line: int
    reason: str


# ---------------------------------------------------------------------------------------------
# 1. reading prompts files


def read_rows(path: Path, defaults: Defaults) -> tuple[list[Row], list[RowError]]:
    """Rows of a .txt / .jsonl / .csv prompts file (UTF-8, with or without a BOM), and the rows
    that could not be read."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise InvalidInputError(f"prompts file {path}: use .txt (a prompt a line), .jsonl or .csv")
    try:
        raw = _read_raw(path, suffix)
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    rows, errors, seen = [], [], set()
    for line_no, obj in raw:
        if isinstance(obj, str):
            errors.append(RowError(None, line_no, obj))
            continue
        own_id = obj.get("id")
        row_id = str(line_no if own_id is None else own_id)
        try:
            if own_id is not None and (isinstance(own_id, bool) or not isinstance(own_id, (str, int))):
                raise InvalidInputError(f"id must be a string or a whole number, got {own_id!r}")
            if row_id in seen:
                which = "its own id" if own_id is not None else "its line number, as no id is given"
                raise InvalidInputError(f"id {row_id!r} ({which}) is taken by an earlier row; ids must be unique")
            row = _row(obj, row_id, line_no, defaults, from_text=suffix == ".csv")
        except InvalidInputError as e:
            errors.append(RowError(row_id, line_no, str(e)))
            continue
        seen.add(row_id)
        rows.append(row)
    return rows, errors


def _read_raw(path: Path, suffix: str) -> list[tuple[int, Any]]:
    """(line number, dict of the row's values, or the reason it cannot be read) per row."""
    raw: list[tuple[int, Any]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drop a BOM (Excel, Notepad)
        if suffix == ".txt":
            for line_no, line in enumerate(f, 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    raw.append((line_no, {"prompt": text}))
        elif suffix == ".jsonl":
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raw.append((line_no, f"not valid JSON: {e}"))
                    continue
                if isinstance(obj, dict):  # an explicit null means "not given"
                    raw.append((line_no, {k: v for k, v in obj.items() if v is not None}))
                else:
                    raw.append((line_no, "a line must be a JSON object"))
        else:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            unknown = [c for c in columns if c not in ROW_KEYS]
            if unknown or "prompt" not in columns:
                raise InvalidInputError(
                    f"{path}: the header must name a 'prompt' column and only these: {', '.join(ROW_KEYS)}"
                    + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                )
            for record in reader:
                raw.append((reader.line_num, {k: v for k, v in record.items() if k and v not in (None, "")}))
    return raw


def _row(obj: dict, row_id: str, line: int, defaults: Defaults, from_text: bool) -> Row:
    unknown = sorted(set(obj) - set(ROW_KEYS))
    if unknown:
        raise InvalidInputError(f"unknown key {unknown[0]!r}; rows may have: {', '.join(ROW_KEYS)}")
    if not isinstance(obj.get("prompt"), str):
        raise InvalidInputError("missing prompt (a string)")

    def number(key: str, kind: type, default):
        if key not in obj:
            return default
        value = obj[key]
        if from_text:  # csv cells are strings
            try:
                value = kind(value)
            except ValueError:
                raise InvalidInputError(f"{key} must be a {'whole number' if kind is int else 'number'}, got {value!r}") from None
        if kind is int and whole_number(value) is None:
            raise InvalidInputError(f"{key} must be a whole number, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidInputError(f"{key} must be a number, got {value!r}")
        return kind(value)

    negative = obj.get("negative_prompt", defaults.negative_prompt)
    scheduler = obj.get("scheduler", defaults.scheduler)
    if not isinstance(negative, str) or not (scheduler is None or isinstance(scheduler, str)):
        raise InvalidInputError("negative_prompt and scheduler must be strings")
    row = Row(
        id=row_id,
        line=line,
        prompt=obj["prompt"],
        negative_prompt=negative,
        seed=number("seed", int, None),
        n=number("n", int, defaults.n),
        steps=number("steps", int, defaults.steps),
        guidance=number("guidance", float, defaults.guidance),
        width=number("width", int, defaults.width),
        height=number("height", int, defaults.height),
        scheduler=scheduler,
    )
    check_values(row.n, row.steps, row.guidance, row.width, row.height, row.scheduler, row.seed)
    return row


# ---------------------------------------------------------------------------------------------
# 2. rows -> images, with seeds that depend on nothing but the row


def image_seed(row: Row, index: int, base_seed: int) -> int:
    """The row's own seed + index, else 64 bits of SHA-256 of (base seed, row id, index)."""
    if row.seed is not None:
        return row.seed + index
    digest = hashlib.sha256(f"{base_seed}/{row.id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def expand(rows: Iterable[Row], base_seed: int) -> list[Item]:
    return [Item(row, i, image_seed(row, i, base_seed)) for row in rows for i in range(row.n)]


def _safe(row_id: str) -> str:
    """A file-name-safe form of a row id (ids from the user may hold any character)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row_id)[:80]
    # keep distinct ids distinct, also on case-insensitive file systems ("A" and "a")
    if safe != row_id or row_id != row_id.lower():
        safe += "_" + hashlib.sha256(row_id.encode()).hexdigest()[:8]
    return safe


# ---------------------------------------------------------------------------------------------
# 3.-5. running


def run_batch(config: BatchConfig) -> int:
    """Make every image of the prompts file that the output folder does not hold yet.

    Returns the exit code: 0 when every row was made, 1 when any row failed (see errors.jsonl).
    Runs under ``accelerate launch`` / ``torchrun`` as it does alone; every process returns the
    same code, and an error in any step that one process does alone reaches all of them.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from ..generation.pipeline import LatentDiffusion

    if whole_number(config.batch_size) is None or config.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {config.batch_size}")
    check_values(config.defaults.n, config.defaults.steps, config.defaults.guidance,
                 config.defaults.width, config.defaults.height, config.defaults.scheduler)  # fmt: skip
    rows, parse_errors = read_rows(config.prompts, config.defaults)
    if not rows and not parse_errors:
        raise InvalidInputError(f"prompts file {config.prompts} holds no prompts")
    items = expand(rows, config.base_seed)

    state = PartialState(cpu=(config.device or "").startswith("cpu") or not torch.cuda.is_available())
    pipe = (
        LatentDiffusion.from_preset(config.preset, seed=config.preset_seed)
        if config.preset
        else LatentDiffusion.from_pretrained(config.model)
    ).to(_process_device(config.device, state), getattr(torch, config.dtype))
    for lora_path, scale in config.loras:
        pipe.load_lora(lora_path, scale=scale)
    if config.fast:
        pipe.optimize(dtype=config.dtype)  # in the run's recorded dtype, so run.json stays true
    run_info = {
        "model": pipe.source,  # for the reader; runs are compared by the weight hash
        "model_hash": pipe.weight_hash(),
        "dtype": config.dtype,
        "device": pipe.device.type,
        "base_seed": config.base_seed,
        "defaults": asdict(config.defaults),
    }
    if config.loras:  # unfused LoRAs are not in the weight hash, so they are part of what makes a run
        run_info["loras"] = [{k: r[k] for k in ("name", "sha256", "scale")} for r in pipe.loras.records()]
    out = Path(config.out)
    lock = _on_main(state, lambda: _prepare_folder(out, items, run_info, pipe.default_size, config.overwrite))

    # After the barrier in _on_main every process sees the same folder, so they all agree on
    # what is left to do; the remaining images are dealt out round-robin.
    pending = [it for it in items if not (out / it.file).exists()]
    mine = pending[state.process_index :: state.num_processes]
    part = out / f"manifest.part-{state.process_index}.jsonl"
    errors = [asdict(e) for e in parse_errors] if state.is_main_process else []

    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), unit="img", desc="images", disable=not (config.progress and state.is_main_process))
    for _, group in groupby(sorted(mine, key=_batch_key), key=_batch_key):
        group = list(group)
        for start in range(0, len(group), config.batch_size):
            chunk = group[start : start + config.batch_size]
            errors += _make(pipe, chunk, out, part)
            bar.update(len(chunk))
    bar.close()
    with atomic_write(out / f"errors.part-{state.process_index}.jsonl", "w") as f:
        f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in errors)

    state.wait_for_everyone()
    _on_main(state, lambda: _merge(out, items))
    failed = bool(errors or parse_errors)
    if state.num_processes > 1:
        failed = any(gather_object([failed]))
    del lock  # held by the main process for the whole run
    return 1 if failed else 0


def _process_device(requested: Optional[str], state) -> str:
    """This process's device: the one asked for, but each process on its own GPU under a launcher."""
    import torch

    if requested is None:
        return str(state.device)
    device = torch.device(requested)
    if device.index is None and device.type == state.device.type and state.num_processes > 1:
        return str(state.device)  # "cuda" under accelerate launch means cuda:LOCAL_RANK
    return requested


def _on_main(state, fn):
    """Run ``fn`` on the main process only; if it fails, every process fails with its message.

    Without this, one process raising while the others wait at a barrier hangs the run.
    """
    result, failure = None, None
    if state.is_main_process:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            failure = e
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [None if failure is None else (isinstance(failure, OSError), str(failure))]
        broadcast_object_list(box, from_process=0)
        if box[0] is not None and failure is None:
            is_os_error, message = box[0]
            raise (OSError if is_os_error else InvalidInputError)(f"on the main process: {message}")
    if failure is not None:
        raise failure
    return result


def check_values(n, steps, guidance, width, height, scheduler, seed=None) -> None:
    """The checks a row (or the CLI defaults) must pass before any model is loaded: the pipeline
    call's own rules (``generation.request``) under the row's column names, plus the most one row
    may ask for."""
    from ..generation import request as rules

    if rules.check_count(n, "n") > MAX_IMAGES_PER_ROW:
        raise InvalidInputError(f"n must be at most {MAX_IMAGES_PER_ROW} images per row, got {n}")
    if rules.check_steps(steps, "steps") > MAX_STEPS:
        raise InvalidInputError(f"steps must be at most {MAX_STEPS}, got {steps}")
    rules.check_guidance(guidance, "guidance")
    for name, value in (("width", width), ("height", height)):
        if value is not None and rules.check_side(value, name, 8) > MAX_SIDE:
            raise InvalidInputError(f"{name} must be at most {MAX_SIDE}, got {value}")
    if scheduler is not None:
        rules.check_scheduler(scheduler)
    if seed is not None:
        rules.expand_seeds(seed, n)  # seed, seed + 1, ..., seed + n - 1 must all be seeds


def _batch_key(item: Item):
    """Items that may share one pipeline call (same size, steps, scheduler, guidance)."""
    r = item.row
    return (r.width or 0, r.height or 0, r.steps, r.scheduler or "", r.guidance)


def _make(pipe, chunk: list[Item], out: Path, part: Path) -> list[dict]:
    """Generate one batch and write its images; returns the error records (empty on success).

    A failed batch never stops the run: bad values in the rows are recorded for each of its rows;
    any other failure (out of memory, say) is retried one image at a time before the images that
    still fail are recorded. An image that cannot be written (disk full) is recorded too.
    """
    from ..generation.recipe import save_png

    start = time.perf_counter()
    try:
        result = pipe(
            [it.row.prompt for it in chunk],
            negative_prompt=[it.row.negative_prompt for it in chunk],
            seed=[it.seed for it in chunk],
            progress=False,
            **chunk[0].request(),
        )
    except LatentDiffusionError as e:
        return [_error(it, str(e)) for it in chunk]
    except Exception as e:  # noqa: BLE001 - one failed batch must not end a run of thousands
        if len(chunk) > 1:
            return [err for it in chunk for err in _make(pipe, [it], out, part)]
        return [_error(chunk[0], f"{type(e).__name__}: {e}")]
    seconds = (time.perf_counter() - start) / len(chunk)
    errors = []
    for item, image, params in zip(chunk, result.images, result.params):
        try:
            save_png(image, out / item.file, params)  # atomic: complete or absent
            _append(part, _manifest_line(item, params, seconds))  # only after the file is in place
        except OSError as e:
            errors.append(_error(item, f"could not write {out / item.file}: {e}"))
    return errors


def _error(item: Item, reason: str) -> dict:
    return {"id": item.row.id, "line": item.row.line, "index": item.index, "reason": reason}


def _manifest_line(item: Item, params: dict, seconds: Optional[float]) -> dict:
    return {"id": item.row.id, "index": item.index, "file": item.file, "seed": item.seed,
            "seconds": None if seconds is None else round(seconds, 4), "params": params}  # fmt: skip


def _append(path: Path, record: dict) -> None:
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


def _read_jsonl(path: Path) -> list[dict]:
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
        for record in _read_jsonl(path):
            if isinstance(record.get("file"), str):
                lines[record["file"]] = record
    return lines


def _recipe_or_none(path: Path) -> Optional[dict]:
    from ..generation.recipe import read_recipe

    try:
        return read_recipe(path)
    except LatentDiffusionError:
        return None


def _prepare_folder(out: Path, items: list[Item], run_info: dict, default_size: int, overwrite: bool):
    """Main process: make ``out`` this run's folder, or refuse. Returns the folder lock.

    Images from another run (other model, dtype, device, base seed or defaults; rows this
    prompts file does not have; a row whose values changed) are never mixed in: that is an
    error, or with ``overwrite`` those images (and nothing else) are deleted. Images of this run
    that lost their manifest line are given it back from their recipe.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    for stale in out.iterdir():  # temporary files of a killed run: never complete, never listed
        if _OUR_TMP.match(stale.name):
            stale.unlink(missing_ok=True)
    for part in out.glob("errors.part-*.jsonl"):  # errors are found afresh by every run
        part.unlink()

    current = {it.file: it for it in items}
    previous = _read_run_file(out)
    same_run = previous is None or _comparable(previous) == _comparable(run_info)
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
    for path in foreign:
        path.unlink()
    for item, recipe in unlisted:
        _append(out / "manifest.part-0.jsonl", _manifest_line(item, recipe, None))
    with atomic_write(out / RUN_FILE, "w") as f:
        json.dump(run_info, f, indent=2, sort_keys=True)
    return lock


def _made_from(recipe: Optional[dict], item: Item, default_size: int) -> bool:
    """Whether a finished image's recipe is what ``item`` asks for."""
    if recipe is None:
        return False
    row = item.row
    expected = {
        "prompt": row.prompt, "negative_prompt": row.negative_prompt, "seed": item.seed,
        "num_inference_steps": row.steps, "guidance_scale": row.guidance, "scheduler": row.scheduler,
        "width": row.width or default_size, "height": row.height or default_size,
    }  # fmt: skip
    return all(recipe.get(k) == v for k, v in expected.items())


def _read_run_file(out: Path) -> Optional[dict]:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"damaged": True}


def _comparable(run_info: dict) -> dict:
    """What makes two runs the same run (the model by its weights, not where it lies)."""
    keys = ("model_hash", "dtype", "device", "base_seed", "defaults", "loras")
    return json.loads(json.dumps({k: run_info.get(k) for k in keys}))


def _merge(out: Path, items: list[Item]) -> None:
    """Join the per-process parts into manifest.jsonl (file order) and errors.jsonl."""
    recorded = _recorded(out)
    lines = [recorded[it.file] for it in items if it.file in recorded and (out / it.file).exists()]
    with atomic_write(out / MANIFEST, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in lines)
    errors = [e for path in sorted(out.glob("errors.part-*.jsonl")) for e in _read_jsonl(path)]
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
