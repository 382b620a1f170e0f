"""The Ray engine of batch inference (``latentdiff batch ... --engine ray``): the rows, seeds, file
names, recipes and manifest of the local engine, on a Ray cluster whose workers may come and go.

The driver (this process) does the steps that need the whole prompts file or the whole folder, with
the local engine's own code:

1. the rows are read and checked by the same reader (bad rows go to ``errors.jsonl``);
2. the folder is locked and checked (another batch there, another run's images: refused); one Ray
   task with a worker's resources loads the model to learn its weight hash for ``run.json``;
3. the images the folder holds already are dropped (one listing of the folder), and the rest are
   planned into pipeline calls (``local.plan``: compatible images together, at most ``--batch-size``
   a call; the calls the local engine makes, so the same images to the bit).

Ray Data runs the calls: a dataset with one row per call, and ``map_batches`` with the actor class
:class:`Generator`, one per worker, holding the pipeline. A worker generates a call, writes each PNG
atomically, then appends its manifest line to its own part. Ray schedules the calls, starts and
stops workers (a fixed number, or a range it scales within), restarts a worker that died and runs
its call again; a call whose images are all there already is skipped. At the end the driver merges
the parts into ``manifest.jsonl`` and the errors into ``errors.jsonl``. A driver that dies takes
its workers with it; the same command again resumes, as with the local engine.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from ..compat import DependencyError
from ..errors import InvalidInputError, LatentDiffusionError
from .folder import check_folder, lock_folder, merge, prepare_folder
from .local import BatchConfig, base_run_info, load_pipeline, model_record, not_made, plan, read_items, summary
from .rows import Item, Row
from .storage import PartWriter, open_folder

INSTALL = 'pip install "latentdiff[ray]"'
MAX_BLOCKS = 10_000  # calls are grouped into at most this many Ray Data blocks (a block is the unit retried)


@dataclass(frozen=True)
class RayOptions:
    address: Optional[str] = None  # a cluster's address (HOST:6379, "auto"); None: RAY_ADDRESS, else a local cluster
    workers: tuple[int, Optional[int]] = (1, None)  # (fewest, most) workers; most None: as many as the cluster fits
    gpus_per_worker: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0; 0.5: two workers per GPU
    cpus_per_worker: float = 1.0  # the CPU threads each CPU worker uses (--threads)
    verbose: bool = False  # Ray's own log lines and progress bars


def require_ray() -> None:
    """Raise a one-line error saying how to install Ray Data when it is missing."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise DependencyError(f"--engine ray needs Ray Data, which is not installed: {INSTALL}") from None


def parse_workers(text: str) -> tuple[int, Optional[int]]:
    """``N`` (a fixed pool), ``MIN-MAX`` (Ray scales the pool within), ``MIN-`` (up to what fits)."""
    low, sep, high = str(text).partition("-")
    try:
        lo = int(low)
        hi = (int(high) if high else None) if sep else lo
    except ValueError:
        raise InvalidInputError(f"--workers takes N, MIN-MAX or MIN-, got {text!r}") from None
    if lo < 1 or (hi is not None and hi < lo):
        raise InvalidInputError(f"--workers needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def run_ray_batch(config: BatchConfig, options: RayOptions = RayOptions()) -> int:
    """Make every image of the prompts file that the output folder does not hold yet, on Ray.

    Returns the exit code (0, or 1 when any row failed) and prints the local engine's closing line.
    Uses the Ray session of the calling process if there is one; else connects to ``options.address``
    (or ``RAY_ADDRESS``, or starts a local cluster) and disconnects at the end.
    """
    require_ray()
    import ray

    rows, parse_errors, items = read_items(config)
    gpus = options.gpus_per_worker
    if gpus is not None and gpus < 0:
        raise InvalidInputError(f"--gpus-per-worker must be 0 or more, got {gpus}")
    wanted = (config.device or "").split(":")[0]
    if wanted not in ("", "cpu", "cuda"):
        raise InvalidInputError(f"--device {config.device} with --engine ray: use cpu or cuda (Ray picks each worker's GPU)")
    if wanted == "cuda" and gpus == 0:
        raise InvalidInputError("--device cuda with --gpus-per-worker 0: give each worker a GPU (--gpus-per-worker 1)")
    if wanted == "cpu" and gpus:
        raise InvalidInputError(f"--device cpu with --gpus-per-worker {gpus}: leave one of them out")

    out = open_folder(config.out)
    lock = lock_folder(out)  # another batch writing there is refused before Ray starts
    started = not ray.is_initialized()
    try:
        if started:
            _connect(options)
        if gpus is None:
            gpus = 0.0 if wanted == "cpu" or ray.cluster_resources().get("GPU", 0) == 0 else 1.0
        # as the local engine does before it loads the model: another run's images are refused
        check_folder(out, items, base_run_info(config, "cuda" if gpus else "cpu"), config.overwrite)
        return _run(config, options, out, rows, parse_errors, items, gpus)
    except ray.exceptions.RayTaskError as e:  # a user's mistake or the environment, found on a worker: one line, as locally
        cause = getattr(e, "cause", None)
        if isinstance(cause, (LatentDiffusionError, OSError)):
            raise cause from None
        raise
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        del lock  # held for the whole run


def _connect(options: RayOptions) -> None:
    """Join the cluster (or start one here). Without ``verbose``, Ray's own log lines, its workers'
    output and its progress bars stay in Ray's log files (our bar and closing line remain)."""
    import logging

    import ray

    if not options.verbose:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    ray.init(address=options.address, logging_level=logging.INFO if options.verbose else logging.ERROR,
             log_to_driver=options.verbose)  # fmt: skip


def _run(config: BatchConfig, options: RayOptions, out, rows, parse_errors, items, gpus: float) -> int:
    import numpy as np
    import ray
    from tqdm.auto import tqdm

    device = "cuda" if gpus else "cpu"
    cpus = 1.0 if gpus else float(options.cpus_per_worker)
    if gpus and ray.cluster_resources().get("GPU", 0) < gpus:
        print(f"latentdiff: waiting for a node with {gpus:g} free GPU(s) (the cluster has none now; an autoscaler "
              "may add one; Ctrl-C to stop)", file=sys.stderr)  # fmt: skip

    # run.json names the model by its weight hash: one load on a worker (the driver may have no GPU,
    # and need not see the model files)
    info = ray.get(ray.remote(_model_info).options(num_cpus=cpus, num_gpus=gpus).remote(config, device))
    run_info = {**info["record"], **base_run_info(config, device)}
    prepare_folder(out, items, run_info, info["default_size"], config.overwrite)

    pending = not_made(out, items)
    calls = plan(pending, config.batch_size)
    errors: list[dict] = []
    if calls:
        dataset = ray.data.from_items([{"call": _encode(c)} for c in calls], override_num_blocks=min(len(calls), MAX_BLOCKS))
        low, high = options.workers
        made = dataset.map_batches(
            Generator,
            fn_constructor_kwargs={"config": config, "device": device, "threads": max(1, round(cpus))},
            batch_size=1,  # one pipeline call at a time; each row is already a whole call
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        bar = tqdm(total=len(pending), unit="img", desc="images", disable=not config.progress)
        for batch in made.iter_batches(batch_size=None, batch_format="numpy"):
            for count, found in zip(np.asarray(batch["images"]).tolist(), batch["errors"]):
                bar.update(int(count))
                errors += json.loads(str(found))
        bar.close()
    errors.sort(key=lambda e: (e["line"], e.get("index") or 0))
    merge(out, items, [asdict(e) for e in parse_errors] + errors)
    print(f"latentdiff: {summary(out, len(rows) + len(parse_errors), len(items), len(pending))}", file=sys.stderr)
    return 1 if errors or parse_errors else 0


def _model_info(config: BatchConfig, device: str) -> dict:
    pipe = load_pipeline(config, device)
    return {"record": model_record(pipe), "default_size": pipe.default_size}


class Generator:
    """A Ray Data worker: the pipeline, loaded once; each call it is given is generated and written
    (each PNG atomically, then its line in this worker's manifest part). A call whose images are all
    in the folder (a call run again after its worker died) is skipped; one with some missing is made
    whole again, so each image is what an uninterrupted run makes."""

    def __init__(self, config: BatchConfig, device: str, threads: int):
        import torch

        from ..fileio import writer

        if device == "cpu":
            torch.set_num_threads(threads)
        self.pipe = load_pipeline(config, device)
        self.out = open_folder(config.out)
        self.part = PartWriter(self.out, f"ray-{writer()}")
        self.control_scales = [scale for _, scale in config.controlnets]

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .local import _make

        counts, errors = [], []
        for text in batch["call"]:
            call = _decode(str(text))
            done = all(self.out.exists(it.file) for it in call)
            errors.append(json.dumps([] if done else _make(self.pipe, call, self.out, self.part, self.control_scales)))
            counts.append(len(call))
        return {"images": np.array(counts), "errors": np.array(errors)}


def _encode(call: list[Item]) -> str:
    """A call as a Ray Data cell: JSON text (seeds are 64-bit unsigned, beyond Arrow's int64)."""
    return json.dumps([{"row": asdict(it.row), "index": it.index, "seed": it.seed} for it in call])


def _decode(text: str) -> list[Item]:
    return [Item(Row(**d["row"]), d["index"], d["seed"]) for d in json.loads(text)]
