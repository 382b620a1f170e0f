"""Where a training stage stands, and how it walks through its data: the one piece of bookkeeping
that the U-Net loop and the VAE stage share.

A stage counts optimizer steps (``step``, up to ``total``), micro-steps (``micro``: batches
consumed, which seed each micro-step's noise), the ``epoch`` and the ``position`` (batches of that
epoch already consumed). Those four numbers are what a checkpoint stores and what a resumed run
starts from, so that it takes exactly the batches an uninterrupted run would have taken.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Optional


class Steps:
    """Counters, the epoch walk, the cadences and the progress bar of one training stage.

    Use::

        for batch in steps.batches(sampler):
            ...forward, backward, optimizer...
            if not steps.advance(accelerator.sync_gradients):
                continue  # gradients still accumulating
            if steps.due(checkpoint_every): save(steps.state())
    """

    def __init__(self, total: int, state: Optional[dict[str, Any]] = None, bar=None):
        self.total = total
        state = state or {}
        self.step = state.get("step", 0)  # optimizer steps done
        self.epoch = state.get("epoch", 0)
        self.position = state.get("position", 0)  # batches of `epoch` already consumed
        self.micro = state.get("micro_step", 0)  # batches consumed in all (one per micro-step)
        self.seconds_before = state.get("seconds", 0.0)  # wall time of the stage's earlier sessions
        self.started = time.perf_counter()
        self.bar = bar  # a tqdm bar (or None), advanced once per optimizer step

    @property
    def finished(self) -> bool:
        return self.step >= self.total

    def batches(self, sampler, load: Callable[[Any], Iterable] = iter) -> Iterator[Any]:
        """The batches still to run, epoch after epoch, from where the stage stands.

        ``sampler`` is a ``BucketBatches`` (its ``epoch`` and ``start`` are set before each epoch,
        so a resumed epoch skips the batches already consumed); ``load(sampler)`` iterates it (a
        ``DataLoader`` over it, say). The caller calls :meth:`advance` once per batch; the walk
        ends as soon as ``total`` optimizer steps are done.
        """
        while not self.finished:
            sampler.epoch, sampler.start = self.epoch, self.position
            for batch in load(sampler):
                yield batch
                if self.finished:
                    return
            self.epoch, self.position = self.epoch + 1, 0  # the epoch ran out: the next starts at its first batch

    def advance(self, synced: bool) -> bool:
        """Count one consumed batch, and an optimizer step if ``synced`` (gradients were applied)."""
        self.micro += 1
        self.position += 1
        if synced:
            self.step += 1
            if self.bar is not None:
                self.bar.update(1)
        return synced

    def every(self, n: int) -> bool:
        """True at every n-th optimizer step (never for n = 0)."""
        return n > 0 and self.step % n == 0

    def due(self, n: int) -> bool:
        """True at every n-th optimizer step but the last: the end of the stage does its own."""
        return self.every(n) and not self.finished

    def seconds(self) -> float:
        """Wall time of the stage so far, all sessions of the run together."""
        return self.seconds_before + time.perf_counter() - self.started

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores to resume exactly here (and the stage's wall time so far)."""
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "micro_step": self.micro,
                "seconds": self.seconds()}  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
