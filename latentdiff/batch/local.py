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
import time
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Optional

from ..checks import whole_number
from ..distributed import on_main
from ..errors import InvalidInputError, LatentDiffusionError
from ..fileio import atomic_write
from .folder import append_line, manifest_line, merge, prepare_folder
from .rows import Defaults, Item, check_values, expand, read_rows


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
    lock = on_main(prepare_folder, out, items, run_info, pipe.default_size, config.overwrite)

    # After on_main (a barrier) every process sees the same folder, so they all agree on
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
    on_main(merge, out, items)
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
            append_line(part, manifest_line(item, params, seconds))  # only after the file is in place
        except OSError as e:
            errors.append(_error(item, f"could not write {out / item.file}: {e}"))
    return errors


def _error(item: Item, reason: str) -> dict:
    return {"id": item.row.id, "line": item.row.line, "index": item.index, "reason": reason}
