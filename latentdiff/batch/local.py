"""The local engine of batch inference: one process, or many under ``accelerate launch`` /
``torchrun``, on this machine's devices.

1. read the prompts file into rows and expand them into images (``rows.py``);
2. load the model once per process; the main process makes the output folder this run's
   (``folder.py``) while the others wait;
3. deal the images not made yet out round-robin (item k to rank k mod world size), batch the
   compatible ones and generate, writing each PNG and its manifest line as it is done;
4. merge the per-process manifest and error parts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Optional, Sequence, Union

from ..checks import Limits, whole_number
from ..distributed import on_main
from ..errors import InvalidInputError, LatentDiffusionError
from .folder import ERRORS, check_folder, lock_folder, manifest_line, merge, prepare_folder
from .rows import Defaults, Item, Row, RowError, check_values, expand, read_rows
from .storage import PartWriter, open_folder


@dataclass
class BatchConfig:
    prompts: Path
    out: Union[Path, str]  # a folder, or a URL of any file system fsspec can write (storage.py)
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
    controlnets: tuple[tuple[str, float], ...] = ()  # (ControlNet folder or file, scale); rows give their control images
    fast: bool = False  # pipe.optimize(dtype=dtype) after the LoRAs: channels_last, fused QKV, torch.compile
    limits: Limits = field(default_factory=Limits)  # the pipeline's limits; --batch-size is bounded by limits.images


def run_batch(config: BatchConfig) -> int:
    """Make every image of the prompts file that the output folder does not hold yet.

    Returns the exit code: 0 when every row was made (or was there already), 1 when any row
    failed; the main process prints one line saying which (the reasons are in errors.jsonl).
    Runs under ``accelerate launch`` / ``torchrun`` as it does alone; every process returns the
    same code, and an error in any step that one process does alone reaches all of them.
    Everything that can be checked without the model (the rows, the options, whether the folder
    is free and holds no other run) is checked before it is loaded.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    rows, parse_errors, items = read_items(config)
    state = PartialState(cpu=(config.device or "").startswith("cpu") or not torch.cuda.is_available())
    device = _process_device(config.device, state)
    run_info = base_run_info(config, torch.device(device).type)
    out = open_folder(config.out)
    # the folder first: taken by another batch, or holding another run, is refused before the load
    lock = on_main(lock_folder, out)
    on_main(check_folder, out, items, run_info, config.overwrite)

    pipe = load_pipeline(config, device)
    run_info = {**model_record(pipe), **run_info}
    on_main(prepare_folder, out, items, run_info, pipe.default_size, config.overwrite)

    # After on_main (a barrier) every process sees the same folder, so they all agree on
    # what is left to do; the remaining images are dealt out round-robin.
    pending = not_made(out, items)
    mine = pending[state.process_index :: state.num_processes]
    part = PartWriter(out, str(state.process_index))
    errors = [asdict(e) for e in parse_errors] if state.is_main_process else []

    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), unit="img", desc="images", disable=not (config.progress and state.is_main_process))
    for chunk in plan(mine, config.batch_size):
        errors += _make(pipe, chunk, out, part, [scale for _, scale in config.controlnets])
        bar.update(len(chunk))
    bar.close()
    out.write(f"errors.part-{state.process_index}.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())

    state.wait_for_everyone()
    on_main(merge, out, items)
    failed = bool(errors or parse_errors)
    if state.num_processes > 1:
        failed = any(gather_object([failed]))
    if state.is_main_process:
        print(f"latentdiff: {summary(out, len(rows) + len(parse_errors), len(items), len(pending))}", file=sys.stderr)
    del lock  # held by the main process for the whole run
    return 1 if failed else 0


# -- the steps both engines share (ray_engine.py runs them as Ray Data stages) ------------------


def read_items(config: BatchConfig) -> tuple[list[Row], list[RowError], list[Item]]:
    """The options checked, the prompts file read: (rows, rows that failed, the images to make)."""
    limits = config.limits
    if whole_number(config.batch_size) is None or config.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.batch_size > limits.images:
        raise limits.exceeded("images", f"--batch-size {config.batch_size}")
    check_values(config.defaults.n, config.defaults.steps, config.defaults.guidance,
                 config.defaults.width, config.defaults.height, config.defaults.scheduler, limits=limits)  # fmt: skip
    rows, parse_errors = read_rows(config.prompts, config.defaults, limits, controls=len(config.controlnets))
    if not rows and not parse_errors:
        raise InvalidInputError(f"prompts file {config.prompts} holds no prompts")
    return rows, parse_errors, expand(rows, config.base_seed)


def base_run_info(config: BatchConfig, device_type: str) -> dict:
    """What makes a run, as far as it is known before the model is loaded (run.json without the model)."""
    run_info = {
        "dtype": config.dtype,
        "device": device_type,
        "base_seed": config.base_seed,
        "defaults": asdict(config.defaults),
    }
    if config.loras:  # unfused LoRAs are not in the weight hash, so they are part of what makes a run
        run_info["loras"] = _lora_records(config.loras)
    if config.controlnets:
        run_info["controlnets"] = _controlnet_records(config.controlnets)
    if device_type == "cpu":  # CPU sums split over another thread count round differently (not bit for bit)
        import torch

        run_info["cpu_threads"] = torch.get_num_threads()
    return run_info


def load_pipeline(config: BatchConfig, device: str):
    """The run's pipeline on ``device``: the model in the run's dtype, its LoRAs, the fast path."""
    import torch

    from ..generation.pipeline import LatentDiffusion

    pipe = (
        LatentDiffusion.from_preset(config.preset, seed=config.preset_seed)
        if config.preset
        else LatentDiffusion.from_pretrained(config.model)
    ).to(device, getattr(torch, config.dtype))
    pipe.limits = config.limits
    for lora_path, scale in config.loras:
        pipe.load_lora(lora_path, scale=scale)
    for controlnet_path, _ in config.controlnets:
        pipe.load_controlnet(controlnet_path)
    if config.fast:
        pipe.optimize(dtype=config.dtype)  # in the run's recorded dtype, so run.json stays true
    return pipe


def model_record(pipe) -> dict:
    """The model in run.json: by its weights (the path is for the reader)."""
    return {"model": pipe.source, "model_hash": pipe.weight_hash()}


def not_made(out, items: list[Item]) -> list[Item]:
    """The images the folder does not hold yet (one listing of the folder, not a look-up per image)."""
    present = set(open_folder(out).names("*.png"))
    return [it for it in items if it.file not in present]


def plan(items: list[Item], batch_size: int) -> list[list[Item]]:
    """The pipeline calls that make ``items``: compatible images together, at most ``batch_size`` a call.

    The same items give the same calls, so the same images to the bit, whichever engine or worker runs them.
    """
    chunks = []
    for _, group in groupby(sorted(items, key=_batch_key), key=_batch_key):
        group = list(group)
        chunks += [group[start : start + batch_size] for start in range(0, len(group), batch_size)]
    return chunks


def summary(out, rows: int, images: int, pending: int) -> str:
    """The line a finished run ends with: what was made, and which rows failed and where the reasons are."""
    from .folder import read_jsonl

    out = open_folder(out)
    failed = read_jsonl(out, ERRORS)
    made = pending - sum(1 for e in failed if e.get("index") is not None)
    if not failed:
        if pending == 0:
            return f"nothing to do: all {images} images are already in {out}"
        return f"{made} images made; all {images} are in {out}"
    bad_rows = {(e.get("line"), e.get("id")) for e in failed}
    first = failed[0]
    where = f"line {first.get('line')}" + (f" (id {first['id']!r})" if first.get("id") is not None else "")
    return (f"{len(bad_rows)} of {rows} rows failed, {made} images made; first: {where}: {first.get('reason')}; "
            f"all reasons in {out.join(ERRORS)}")  # fmt: skip


def _lora_records(loras) -> list[dict]:
    """What identifies the run's LoRAs (name, file hash, scale), read from the files before any model load."""
    from ..errors import MissingFileError
    from ..models.hashing import file_sha256

    for path, _ in loras:
        if not Path(path).is_file():
            raise MissingFileError(f"LoRA file {path} does not exist (--lora)")
    return [{"name": Path(path).stem, "sha256": file_sha256(path), "scale": float(scale)} for path, scale in loras]


def _controlnet_records(controlnets) -> list[dict]:
    """What identifies the run's ControlNets (name, file hash, scale), read before any model load: a
    folder by its weights file."""
    from ..errors import MissingFileError
    from ..models.hashing import file_sha256

    records = []
    for path, scale in controlnets:
        target = Path(path)
        if target.is_dir():
            weights = sorted(target.glob("diffusion_pytorch_model*")) or sorted(target.glob("controlnet/diffusion_pytorch_model*"))
            target = weights[0] if weights else target / "diffusion_pytorch_model.safetensors"
        if not target.is_file():
            raise MissingFileError(f"ControlNet {path} does not exist or has no weights (--controlnet)")
        records.append({"name": Path(path).stem, "sha256": file_sha256(target), "scale": float(scale)})
    return records


def _process_device(requested: Optional[str], state) -> str:
    """This process's device: the one asked for, but each process on its own GPU under a launcher."""
    import torch

    if requested is None:
        return str(state.device)
    device = torch.device(requested)
    if device.index is None and device.type == state.device.type and state.num_processes > 1:
        return str(state.device)  # "cuda" under accelerate launch means cuda:LOCAL_RANK
    return requested


def _batch_key(item: Item):
    """Items that may share one pipeline call (same size, steps, scheduler, guidance)."""
    r = item.row
    return (r.width or 0, r.height or 0, r.steps, r.scheduler or "", r.guidance)


def _make(pipe, chunk: list[Item], out, part: PartWriter, control_scales: Sequence[float] = ()) -> list[dict]:
    """Generate one batch and write its images; returns the error records (empty on success).

    A failed batch never stops the run: bad values in the rows are recorded for each of its rows;
    any other failure (out of memory, say) is retried one image at a time before the images that
    still fail are recorded. An image that cannot be written (disk full) is recorded too.
    """
    out = open_folder(out)
    try:
        return _make_one_call(pipe, chunk, out, part, control_scales)
    finally:
        part.flush()


def _make_one_call(pipe, chunk: list[Item], out, part: PartWriter, control_scales: Sequence[float] = ()) -> list[dict]:
    from ..generation.recipe import png_bytes

    start = time.perf_counter()
    control = {}
    if control_scales:  # each image's own control images: per ControlNet, one per prompt
        per_control = [[it.row.control_image[j] for it in chunk] for j in range(len(control_scales))]
        control = {"control_image": per_control[0] if len(per_control) == 1 else per_control,
                   "control_scale": control_scales}  # fmt: skip
    try:
        result = pipe(
            [it.row.prompt for it in chunk],
            negative_prompt=[it.row.negative_prompt for it in chunk],
            seed=[it.seed for it in chunk],
            progress=False,
            **chunk[0].request(),
            **control,
        )
    except LatentDiffusionError as e:
        return [_error(it, str(e)) for it in chunk]
    except Exception as e:  # noqa: BLE001 - one failed batch must not end a run of thousands
        if len(chunk) > 1:
            return [err for it in chunk for err in _make_one_call(pipe, [it], out, part, control_scales)]
        return [_error(chunk[0], f"{type(e).__name__}: {e}")]
    seconds = (time.perf_counter() - start) / len(chunk)
    errors = []
    for item, image, params in zip(chunk, result.images, result.params):
        try:
            out.write(item.file, png_bytes(image, params))  # atomic: complete or absent
            part.add(manifest_line(item, params, seconds))  # only after the file is in place
        except OSError as e:
            errors.append(_error(item, f"could not write {out.join(item.file)}: {e}"))
    return errors


def _error(item: Item, reason: str) -> dict:
    return {"id": item.row.id, "line": item.row.line, "index": item.index, "reason": reason}
