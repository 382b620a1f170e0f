"""The worker: one thread that drains the queue, in U-Net batches that change no pixel.

Batching that changes no pixel: by the seed contract image i is made from its own seed alone, so
images of different jobs can share a U-Net call when every other argument that reaches the U-Net,
the scheduler and the decoder is equal (``jobs.prepare`` makes that the batch key). What can still
differ is rounding: batched kernels round differently at other batch *sizes* (~1e-6, now and then
one pixel level). So every call runs exactly ``batch_size`` images: a batch that is not full is
padded with copies of its last image, whose results are dropped. An image is then computed at the
same batch size whether it shares its call or not, and comes out the same, bit for bit (tested).
With ``batch_size`` 1 nothing is shared or padded.

Each image's PNG is written atomically under ``{job}-{k}.png`` before the queue records it, so a
crash at any moment leaves whole files only, and a job made again writes the same names.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from .jobs import open_base64
from .queue import JobQueue

log = logging.getLogger("latentdiff.serve")
EXPIRE_EVERY = 3600.0  # seconds between retention sweeps


class Cancelled(Exception):
    pass


class Worker:
    def __init__(self, pipe, queue: JobQueue, images_dir: Path, batch_size: int, keep_seconds: float):
        self.pipe, self.queue, self.images_dir = pipe, queue, Path(images_dir)
        self.batch_size, self.keep_seconds = batch_size, keep_seconds
        self.progress: dict[str, dict[str, int]] = {}  # job id -> {"step", "steps"} while it runs
        self.cancelled: set[str] = set()  # running jobs asked to stop
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="latentdiff-worker", daemon=True)
        self._last_expiry = 0.0

    # -- control -------------------------------------------------------------------------------------

    def start(self) -> None:
        for stray in self.images_dir.glob(".*.tmp"):  # a PNG being written when the process died
            stray.unlink(missing_ok=True)
        recovered = self.queue.recover()
        if recovered:
            log.warning("latentdiff serve: %d job(s) were running when the server stopped; they continue", recovered)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def notify(self) -> None:
        """A job was queued (or cancelled): look at the queue now."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        self.cancelled.add(job_id)

    # -- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.time() - self._last_expiry > EXPIRE_EVERY:
                self._expire()
            try:
                batch = self.queue.next_batch(self.batch_size)
            except Exception:  # the database is gone or locked: try again shortly
                log.exception("latentdiff serve: cannot read the queue")
                batch = []
            if not batch:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._run(batch)

    def _expire(self) -> None:
        self._last_expiry = time.time()
        for name in self.queue.expire(self.keep_seconds):
            (self.images_dir / name).unlink(missing_ok=True)

    def _run(self, batch: list[tuple[dict, int]]) -> None:
        job_ids = list(dict.fromkeys(job["id"] for job, _ in batch))
        try:
            rows, notes = self._generate(batch, job_ids)
        except Cancelled:
            return
        except Exception as e:  # noqa: BLE001 - a job's failure is reported on the job, never kills the worker
            if len(job_ids) > 1:  # find the one that fails: run each job on its own
                for job_id in job_ids:
                    self._run([(job, k) for job, k in batch if job["id"] == job_id])
                return
            log.exception("latentdiff serve: job %s failed", job_ids[0])
            self.queue.fail(job_ids[0], f"{type(e).__name__}: {e}")
            return
        finally:
            for job_id in job_ids:
                self.progress.pop(job_id, None)
                self.cancelled.discard(job_id)
        self.queue.record_images(rows, notes)

    def _generate(self, batch: list[tuple[dict, int]], job_ids: list[str]):
        """Make the batch's images, padded to ``batch_size``; write their PNGs; return the rows
        to record and the warnings per job."""
        from ..generation.recipe import save_png

        spec = batch[0][0]["spec"]  # every argument but prompt, seed and input images is the same
        items = batch + [batch[-1]] * (self.batch_size - len(batch))  # padding: results dropped
        decoded: dict[tuple[str, str], Any] = {}

        def picture(job, field) -> Optional[Any]:
            if job["spec"].get(field) is None:
                return None
            if (job["id"], field) not in decoded:
                decoded[job["id"], field] = open_base64(job["spec"][field])
            return decoded[job["id"], field]

        steps = _expected_steps(spec)
        done = [0]

        def step(i, t, latents):
            done[0] += 1
            for job_id in job_ids:
                self.progress[job_id] = {"step": min(done[0], steps), "steps": steps}
            if all(j in self.cancelled for j in job_ids):
                raise Cancelled()

        for job_id in job_ids:
            self.progress[job_id] = {"step": 0, "steps": steps}
        call = {k: spec[k] for k in ("num_inference_steps", "guidance_scale", "guidance_rescale", "height", "width",
                                     "scheduler", "eta", "clip_skip", "strength", "hires_scale", "hires_strength",
                                     "hires_upscale")}  # fmt: skip
        images = [picture(job, "image") for job, _ in items]
        masks = [picture(job, "mask_image") for job, _ in items]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = self.pipe(
                prompt=[job["spec"]["prompt"] for job, _ in items],
                negative_prompt=[job["spec"]["negative_prompt"] for job, _ in items],
                seed=[job["spec"]["seeds"][k] for job, k in items],
                image=images if images[0] is not None else None,
                mask_image=masks if masks[0] is not None else None,
                callback=step, progress=False, **call,
            )  # fmt: skip
        rows, batch_id = [], secrets.token_hex(6)
        for (job, k), image, params in zip(batch, result.images, result.params):
            if job["id"] in self.cancelled:
                continue
            name = f"{job['id']}-{k}.png"
            save_png(image, self.images_dir / name, params)
            rows.append({"job_id": job["id"], "k": k, "file": name, "seed": params["seed"], "params": params,
                         "batch": batch_id})
        notes = [str(w.message) for w in caught]
        return rows, ({job_id: notes for job_id in job_ids} if notes else {})


def _expected_steps(spec: dict) -> int:
    """U-Net steps the call runs (the progress bar's end): the steps, or their share at a strength."""
    steps = spec["num_inference_steps"]
    first = min(int(steps * spec["strength"]), steps) if spec.get("strength") is not None else steps
    if spec.get("hires_scale") is not None:
        first += min(int(steps * spec["hires_strength"]), steps)
    return max(first, 1)
